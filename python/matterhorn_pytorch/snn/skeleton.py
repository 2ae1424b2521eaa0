"""``Module``: the base of every matterhorn layer, holding its time-step mode.

Multi-step input is ``[T, B, ...]`` (``[B, T, ...]`` with ``batch_first=True``); single-step
input is ``[B, ...]``. The default is multi-step; ``multi_time_step=False`` at construction or
``single_step_mode_()`` later switches to single-step.
"""

from typing import Optional

import torch
import torch.nn as nn


def dtype_remedy(input: torch.dtype, layer: torch.dtype, what: str) -> str:
    """What to do about an input of another dtype than the layer's: an integer, bool, complex or
    float8 input is cast (the layers compute in a floating dtype), a floating one may move the layer."""
    if input not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"cast the {what} to {layer}"
    return f"cast the {what} or call .to({input}) on the layer"


class Module(nn.Module):
    """Base of matterhorn layers: time-step mode, ``batch_first``, ``reset()`` and ``detach()``."""

    # Read-only views of step_mode; TorchScript only needs step_mode itself.
    __jit_unused_properties__ = ["multi_step_mode", "single_step_mode"]

    step_mode: str  # 'm' (multi-step) or 's' (single-step)
    batch_first: bool
    # Why the layer has no single-step mode (it normalizes over time), or None where it has one.
    _MULTI_STEP_ONLY = None

    def __init__(self, *, multi_time_step: Optional[bool] = None, batch_first: bool = False) -> None:
        super().__init__()
        self._init_step_mode(multi_time_step, batch_first)

    def _init_step_mode(self, multi_time_step: Optional[bool], batch_first: bool) -> None:
        """Set the mode attributes; layers that also inherit a torch.nn class call this after it."""
        if multi_time_step is not None and not isinstance(multi_time_step, bool):
            raise TypeError(f"{self._get_name()}: multi_time_step must be a bool or None, got {multi_time_step!r}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"{self._get_name()}: batch_first must be a bool, got {batch_first!r}")
        self.step_mode = "s" if multi_time_step is False else "m"
        self.batch_first = batch_first

    @property
    def multi_step_mode(self) -> bool:
        return self.step_mode == "m"

    @property
    def single_step_mode(self) -> bool:
        return self.step_mode == "s"

    def multi_step_mode_(self, if_on: bool = True, recursive: bool = True) -> "Module":
        """Switch to multi-step mode (or single-step if ``if_on`` is False); with ``recursive``,
        every matterhorn module below this one switches too. Returns the module."""
        mode = "m" if if_on else "s"
        modules = [(name, m) for name, m in (self.named_modules() if recursive else [("", self)])
                   if isinstance(m, Module)]
        for name, module in modules if not if_on else ():  # refused before any layer switches
            if module._MULTI_STEP_ONLY is not None:
                where = f" (at '{name}' in {self._get_name()})" if name else ""
                raise ValueError(f"{module._get_name()}{where}: a multi-step layer ({module._MULTI_STEP_ONLY}); "
                                 "single-step mode is not supported")
        for _, module in modules:
            module.step_mode = mode
        return self

    def single_step_mode_(self, if_on: bool = True, recursive: bool = True) -> "Module":
        """Switch to single-step mode (or multi-step if ``if_on`` is False). Returns the module."""
        return self.multi_step_mode_(not if_on, recursive)

    def reset(self) -> "Module":
        """Clear the state between sequences in this module and the matterhorn modules below it."""
        for module in self.children():
            if isinstance(module, Module):
                module.reset()
        return self

    def detach(self) -> "Module":
        """Cut the state's autograd history (truncated BPTT) here and below. Returns the module."""
        for module in self.children():
            if isinstance(module, Module):
                module.detach()
        return self

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"step_mode='{self.step_mode}'"]
        if self.batch_first:
            parts.append("batch_first=True")
        return ", ".join(part for part in parts if part)
