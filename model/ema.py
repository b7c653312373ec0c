"""Exponential moving average of model parameters.

Same API and semantics as ``model/ema.py`` of the original SEDD repo (itself from score_sde), so its
``ema`` state dicts load unchanged: ``{"decay": float, "num_updates": int | None,
"shadow_params": list[Tensor]}``. Only parameters with ``requires_grad`` get a shadow copy; frozen
parameters are skipped the same way by every method, so pass the same ``parameters()`` each time.

Swap the averaged weights in for evaluation with the context manager::

    with ema.average_parameters(model.parameters()):
        evaluate(model)          # EMA weights; the training weights come back afterwards
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """Shadow copy ``s`` of the trainable parameters ``p``, updated as ``s <- s - (1 - decay) (s - p)``.

    Args:
        parameters: the model's parameters (e.g. ``model.parameters()``).
        decay: EMA decay in ``[0, 1]``, e.g. 0.9999.
        use_num_updates: warm up the decay as ``min(decay, (1 + n) / (10 + n))`` where ``n`` counts
            updates (1 on the first call), as in the original.
    """

    def __init__(
        self, parameters: Iterable[torch.nn.Parameter], decay: float, use_num_updates: bool = True
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay = float(decay)
        self.num_updates: int | None = 0 if use_num_updates else None
        self.shadow_params: list[torch.Tensor] = [p.detach().clone() for p in parameters if p.requires_grad]
        self.collected_params: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------------------

    def _trainable(self, parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        params = [p for p in parameters if p.requires_grad]
        if len(params) != len(self.shadow_params):
            raise ValueError(
                f"EMA holds {len(self.shadow_params)} shadow tensors but got {len(params)} trainable "
                "parameters; pass the same model.parameters() (with the same frozen parameters) as at "
                "construction."
            )
        return params

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use (without counting the update)."""
        if self.num_updates is None:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.Tensor]) -> None:
        """Move the shadow parameters toward ``parameters``; call after each optimizer step."""
        params = self._trainable(parameters)
        decay = self.current_decay()
        if self.num_updates is not None:
            self.num_updates += 1
        if not self.shadow_params:
            return
        # lerp_(s, p, w) = s + w (p - s) = s - (1 - decay)(s - p) with w = 1 - decay.
        # .to() returns the tensor itself when dtype and device already match (no copy).
        targets = [
            p.detach().to(dtype=s.dtype, device=s.device)
            for s, p in zip(self.shadow_params, params, strict=True)
        ]
        torch._foreach_lerp_(self.shadow_params, targets, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the shadow values into the trainable ``parameters`` (frozen ones are untouched)."""
        params = self._trainable(parameters)
        if params:
            torch._foreach_copy_(params, self.shadow_params)

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save a copy of all ``parameters`` so :meth:`restore` can put them back."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the values saved by :meth:`store`, then free that copy."""
        params = list(parameters)
        if len(params) != len(self.collected_params):
            raise RuntimeError(
                f"restore() got {len(params)} parameters but store() saved {len(self.collected_params)}; "
                "call store() with the same parameters first."
            )
        if params:
            torch._foreach_copy_(params, self.collected_params)
        self.collected_params = []

    @contextmanager
    def average_parameters(self, parameters: Iterable[torch.Tensor]) -> Iterator[None]:
        """Use the EMA weights inside the block; the original weights return on exit, also on error."""
        params = list(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ExponentialMovingAverage:
        """Move the shadow (and stored) tensors; ``dtype`` applies to floating-point tensors only."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        self.shadow_params = [move(t) for t in self.shadow_params]
        self.collected_params = [move(t) for t in self.collected_params]
        return self

    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "num_updates", "shadow_params"}``, the original repo's layout."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": self.shadow_params}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or the original repo.

        Values are copied into the existing shadow tensors, which keep their device and dtype.
        """
        missing = [k for k in ("decay", "num_updates", "shadow_params") if k not in state_dict]
        if missing:
            raise KeyError(f"EMA state dict is missing {missing}; got keys {sorted(state_dict)}.")
        shadow = list(state_dict["shadow_params"])
        if len(shadow) != len(self.shadow_params):
            raise ValueError(
                f"EMA state dict has {len(shadow)} shadow tensors but this model has "
                f"{len(self.shadow_params)} trainable parameters; it was saved for a different model "
                "or different frozen parameters."
            )
        for i, (mine, theirs) in enumerate(zip(self.shadow_params, shadow, strict=True)):
            if mine.shape != theirs.shape:
                raise ValueError(
                    f"EMA shadow tensor {i} has shape {tuple(theirs.shape)} in the state dict but "
                    f"{tuple(mine.shape)} in this model; the checkpoint is for a different model config."
                )
        if shadow:
            torch._foreach_copy_(self.shadow_params, shadow)
        self.decay = float(state_dict["decay"])
        num_updates = state_dict["num_updates"]
        self.num_updates = None if num_updates is None else int(num_updates)
