"""Reinforcement learning for SEDD models (run_rl.py): one module per piece.

rollout.py   batched prompted generation from the policy, k completions per prompt ([B x G, L] batches)
rewards.py   reward functions `reward(prompts, completions, **fields) -> list[float]`
kl.py        the ELBO estimate of KL(policy || reference) with common random numbers
buffer.py    weighted SFT examples built from scored completions, their minibatches and weighted loss
reft.py      rejection-sampling fine-tuning (keep the best / those over a threshold, SFT on them)
rwd.py       reward-weighted denoising (SFT loss weighted by exp(A / beta) or a softmax over the group)
guidance.py  reward-guided sampling without retraining (SVDD-style value-weighted resampling, best-of-N)
"""
