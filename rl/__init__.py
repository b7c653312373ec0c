"""Reinforcement learning for SEDD models (run_rl.py): one module per piece.

rollout.py   batched prompted generation from the policy, k completions per prompt ([B x G, L] batches)
rewards.py   reward functions `reward(prompts, completions, **fields) -> list[float]`
kl.py        the ELBO estimate of KL(policy || reference) with common random numbers
buffer.py    weighted SFT examples built from scored completions, their minibatches and weighted loss
reft.py      rejection-sampling fine-tuning (keep the best / those over a threshold, SFT on them)
rwd.py       reward-weighted denoising (SFT loss of completions resampled / weighted by exp(A / beta) or softmax)
estimators.py  sequence log-likelihood estimates for the likelihood-ratio methods (ELBO, one-step mean field)
dpo.py       diffusion DPO on preference pairs (online best/worst of k, or offline)
pg.py        GRPO-style policy gradient with a clipped ratio and a KL penalty to the start
guidance.py  reward-guided sampling without retraining (SVDD-style value-weighted resampling, best-of-N)
"""
