"""Synapses: layers that map spike trains to postsynaptic potentials.

Every built-in layer is a subclass of its torch.nn twin (same parameters, initialisation and
state_dict keys) whose forward is one ``torch.ops.matterhorn`` call in either mode: the C++ op
folds ``[T, B, ...]`` into one batched computation.
"""

from typing import Optional

import torch
import torch.nn as nn

from .skeleton import Module


class Synapse(Module):
    """Base for synapses. Override ``forward_step`` for a synapse that does not depend on time:
    multi-step input ``[T, B, ...]`` is then folded to ``[T*B, ...]``, passed to one
    ``forward_step`` call and unfolded. Override ``forward_steps`` for one that does."""

    def forward_step(self, o: torch.Tensor) -> torch.Tensor:
        """One time step: ``[B, ...]`` -> ``[B, ...]``."""
        raise NotImplementedError("a Synapse subclass must override forward_step or forward_steps")

    def forward_steps(self, o: torch.Tensor) -> torch.Tensor:
        """All time steps at once: ``[T, B, ...]`` -> ``[T, B, ...]``."""
        if o.dim() < 2:
            raise ValueError(
                "Synapse: multi-step input must be [T, B, ...] (or [B, T, ...] with batch_first); got "
                + str(o.shape)
            )
        return self.forward_step(o.flatten(0, 1)).unflatten(0, [o.shape[0], o.shape[1]])

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            if self.batch_first:  # forward_steps always sees [T, B, ...]
                return self.forward_steps(o.transpose(0, 1)).transpose(0, 1)
            return self.forward_steps(o)
        return self.forward_step(o)


class Linear(Synapse, nn.Linear):
    """Fully connected synapse: ``[T, B, ..., I] -> [T, B, ..., O]`` (multi-step) or
    ``[B, ..., I] -> [B, ..., O]`` (single-step), computed as one GEMM over every leading
    position. The result is the same in both modes."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        multi_time_step: Optional[bool] = None,
        batch_first: bool = False,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_step_mode(multi_time_step, batch_first)

    def forward_step(self, o: torch.Tensor) -> torch.Tensor:
        return torch.ops.matterhorn.linear(o, self.weight, self.bias)

    def forward_steps(self, o: torch.Tensor) -> torch.Tensor:
        return torch.ops.matterhorn.linear(o, self.weight, self.bias)

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        # A per-position map: [T, B] or [B, T] order and the mode do not change the arithmetic.
        return torch.ops.matterhorn.linear(o, self.weight, self.bias)


__all__ = ["Synapse", "Linear"]
