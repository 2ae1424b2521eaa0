"""``fuse(model)``: a copy of a model for inference with each BatchNorm folded into the Linear,
convolution or transposed convolution that it directly follows in an ``nn.Sequential``."""

import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["fuse"]


def _foldable_classes() -> tuple:
    """Layers whose forward uses ``weight`` and ``bias`` as they are: torch.nn's Linear and
    convolutions and ours. Subclasses are left out on purpose: one that derives its weight (the
    weight-standardised layers) would undo a fold into the raw weight."""
    from . import snn

    names = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]
    return tuple(getattr(nn, name) for name in names) + tuple(getattr(snn, name) for name in names)


def _output_channels(layer: nn.Module) -> Optional[Tuple[int, int]]:
    """The output channels of a layer a BatchNorm can be folded into, with the rank of the
    BatchNorm that normalizes them (a Linear's features are BatchNorm1d's channels), else None."""
    if type(layer) not in _foldable_classes():
        return None
    if isinstance(layer, nn.Linear):
        return layer.out_features, 1
    return layer.out_channels, len(layer.kernel_size)


def _batch_norm_rank(bn: _BatchNorm) -> Optional[int]:
    """1, 2 or 3 for a BatchNorm{1,2,3}d; None for one of any rank (SyncBatchNorm)."""
    for rank, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(bn, cls):
            return rank
    return None


def _plain_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm whose eval is ``x * scale + shift`` per channel: torch.nn's or ours, or a
    subclass that changes no forward (an initialisation), with per-channel parameters and
    statistics. A temporal one (a scale per step, statistics per step) is not."""
    from .snn.synapse import _BatchNorm as _OurBatchNorm

    if not isinstance(module, _BatchNorm):
        return False
    if type(module).forward not in (_BatchNorm.forward, _OurBatchNorm.forward, nn.SyncBatchNorm.forward):
        return False
    return all(t is None or t.dim() == 1 for t in (module.weight, module.bias, module.running_mean, module.running_var))


def _scale_and_shift(bn: _BatchNorm, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` per channel, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        # Eval then normalises with the batch's own statistics: no fixed affine map to fold.
        raise ValueError(
            f"mth.fuse: {where} ({type(bn).__name__}) has track_running_stats=False, so eval normalises "
            "with each batch's statistics, which cannot be folded into a weight; build it with "
            "track_running_stats=True or take it out of the nn.Sequential")
    if not bn.eps >= 0:  # as the layer refuses it in eval
        raise ValueError(f"mth.fuse: {where} ({type(bn).__name__}): eps must be non-negative, got {bn.eps}")
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def _fold(layer: nn.Module, bn: _BatchNorm, where: str) -> nn.Module:
    """A copy of ``layer`` with ``bn`` (in eval mode) folded into its weight and bias (the layer
    itself may be used elsewhere too, unfused)."""
    scale, shift = _scale_and_shift(bn, where)
    layer = copy.deepcopy(layer)
    weight = layer.weight.double()
    if isinstance(layer, _ConvNd) and layer.transposed:
        # Weight [C_in, C_out / groups, k...]: output channel g * (C_out / groups) + j is [g-th
        # block of inputs, j].
        groups = layer.groups
        blocks = weight.unflatten(0, (groups, -1))
        weight = (blocks * scale.view(groups, 1, -1, *[1] * (weight.dim() - 2))).flatten(0, 1)
    else:  # Linear [C_out, C_in], convolution [C_out, C_in / groups, k...]
        weight = weight * scale.view(-1, *[1] * (weight.dim() - 1))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    dtype, device = layer.weight.dtype, layer.weight.device
    requires_grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=requires_grad)
    layer.bias = nn.Parameter(bias.to(dtype=dtype, device=device), requires_grad=requires_grad)
    return layer


def _fuse_sequential(sequential: nn.Sequential, prefix: str) -> None:
    names = list(sequential._modules.keys())
    for name, next_name in zip(names, names[1:]):
        layer, bn = sequential._modules[name], sequential._modules[next_name]
        channels = _output_channels(layer)
        # A BatchNorm over another dimension than the layer's channels (a BatchNorm2d after a
        # Linear; a Linear on [T, B, N, F] before a BatchNorm1d(N)) is no per-channel affine of them.
        if channels is None or not _plain_batch_norm(bn) or bn.num_features != channels[0] or \
                _batch_norm_rank(bn) not in (None, channels[1]):
            continue
        sequential._modules[name] = _fold(layer, bn, prefix + next_name)
        sequential._modules[next_name] = nn.Identity()


def fuse(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference in which each BatchNorm (ours or torch.nn's) that directly
    follows a Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d (ours or torch.nn's) in an
    ``nn.Sequential`` (nested ones included) is folded into that layer's weight and bias and
    replaced by ``nn.Identity`` (so the other layers keep their names). A layer or BatchNorm
    subclass that overrides forward (a derived weight, a per-step scale) is not a pair. ``model`` must be in eval
    mode and is not changed. A BatchNorm without running statistics (``track_running_stats=False``)
    in such a pair is refused with a ``ValueError``: eval normalises it with batch statistics.
    A bias-free layer gets a bias. The fold is computed in float64 and cast to the layer's dtype."""
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"mth.fuse: expected an eager nn.Module, got {type(model).__name__} "
                        "(fuse before torch.jit.script or trace)")
    training = [name or type(model).__name__ for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(
            "mth.fuse: the model is in training mode ("
            + ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
            + "); folding uses the running statistics that training changes: call model.eval() first")
    fused = copy.deepcopy(model)
    for name, module in list(fused.named_modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module, name + "." if name else "")
    return fused
