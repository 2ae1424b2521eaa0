"""The layers' computation in plain ATen calls (torch.nn.functional on the folded tensor, the
normalizations broadcast over the unfolded one), taken instead of the ``torch.ops.matterhorn``
ops while ``torch.onnx.export`` runs: both exporters (``dynamo=True`` through torch.export, and
the TorchScript tracer) then see only ops that have standard ONNX translations (Conv,
ConvTranspose, Gemm / MatMul, LayerNormalization, Reshape, Pad, ReduceMean, Sub, Mul ...), and
no custom ONNX domain is needed.

Each function takes the arguments of the op of the same name (``batch_norm``: those of the layer
op ``batch_norm_layer``). Everywhere else (eager, TorchScript, torch.compile, torch.export, C++)
the ops run; these functions are ``torch.jit.unused``, so a scripted layer holds none of them."""

import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

_CONV = (F.conv1d, F.conv2d, F.conv3d)
_CONV_TRANSPOSE = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def _flag_reader():
    """``torch.onnx.is_in_onnx_export`` imports two modules on every call (about 1.4 us, a tenth
    of a small layer's call): read the two flags it reads directly, or call it if they moved."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        _flags = GLOBALS = None
    if hasattr(_flags, "_is_onnx_exporting") and hasattr(GLOBALS, "in_onnx_export"):
        return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting
    return sys.modules["torch.onnx"].is_in_onnx_export


_read_flag = None


@torch.jit.unused
def exporting() -> bool:
    """Whether torch.onnx.export is running (either exporter). torch.onnx is imported by then
    (torch.export imports it too); until it is, nothing is imported here."""
    global _read_flag
    if torch.compiler.is_dynamo_compiling():  # torch.compile: the ops; dynamo cannot read the flags
        return False
    if _read_flag is None:
        if "torch.onnx" not in sys.modules:
            return False
        _read_flag = _flag_reader()
    return _read_flag()


def _fold(input: torch.Tensor, multi_step: bool) -> torch.Tensor:
    return input.flatten(0, 1) if multi_step else input


def _unfold(output: torch.Tensor, input: torch.Tensor, multi_step: bool) -> torch.Tensor:
    # size() calls, which the TorchScript tracer records (dynamic T and B), not Python ints.
    return output.view([input.size(0), input.size(1)] + list(output.shape[1:])) if multi_step else output


@torch.jit.unused
def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(input, weight, bias)


@torch.jit.unused
def conv(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
         padding: List[int], dilation: List[int], groups: int, padding_mode: str = "zeros") -> torch.Tensor:
    spatial = weight.dim() - 2
    multi_step = input.dim() == weight.dim() + 1
    x = _fold(input, multi_step)
    if padding_mode != "zeros" or len(padding) == 2 * spatial:
        # Explicit padding, as torch.nn pads for these modes; F.pad lists the last dimension first.
        pairs = padding if len(padding) == 2 * spatial else [p for p in padding for _ in range(2)]
        pads = [p for d in reversed(range(spatial)) for p in pairs[2 * d:2 * d + 2]]
        x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
        padding = [0] * spatial
    output = _CONV[spatial - 1](x, weight, bias, stride, padding, dilation, groups)
    return _unfold(output, input, multi_step)


@torch.jit.unused
def conv_transpose(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                   padding: List[int], output_padding: List[int], groups: int, dilation: List[int],
                   output_size: Optional[List[int]] = None) -> torch.Tensor:
    spatial = weight.dim() - 2
    multi_step = input.dim() == weight.dim() + 1
    x = _fold(input, multi_step)
    if output_size is not None:  # spatial sizes, or the whole output shape
        sizes = list(output_size)[-spatial:]
        smallest = [(int(x.shape[2 + d]) - 1) * stride[d] - 2 * padding[d] + dilation[d] * (weight.shape[2 + d] - 1) + 1
                    for d in range(spatial)]
        output_padding = [int(size) - smallest[d] for d, size in enumerate(sizes)]
    output = _CONV_TRANSPOSE[spatial - 1](x, weight, bias, stride, padding, output_padding, groups, dilation)
    return _unfold(output, input, multi_step)


def _laid_over(t: torch.Tensor, input: torch.Tensor, channel: int, time: int) -> torch.Tensor:
    """``t`` broadcast over ``input``: [C] along the channels, [T, C] (per step) along time and
    the channels."""
    shape = [1] * input.dim()
    if t.dim() == 2:
        shape[time], shape[channel] = t.shape[0], t.shape[1]
    else:
        shape[channel] = -1
    return t.view(shape)


@torch.jit.unused
def batch_norm(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               num_batches_tracked: Optional[torch.Tensor], training: bool, momentum: Optional[float],
               eps: float, layer: str, num_features: int, multi_step_mode: bool, per_step: bool = False,
               batch_first: bool = False, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """matterhorn::batch_norm_layer's arguments and layout rules (ops/batch_norm_layer.cpp: the
    layer's name ends in its 1d/2d/3d; a scale per step or per-step parameters make it a
    multi-step layer), as per-channel arithmetic broadcast over the unfolded input: no reshape,
    whose computed sizes would leave the TorchScript exporter without the channel count."""
    dims = int(layer[-2])
    per_step_tensors = any(t is not None and t.dim() == 2 for t in (weight, running_mean))
    multi_step_mode = multi_step_mode or scale is not None or per_step_tensors
    multi_step = (input.dim() == 4 or (input.dim() == 3 and multi_step_mode)) if dims == 1 else input.dim() == dims + 3
    channel = 2 if multi_step else 1
    time = 1 if batch_first else 0
    if running_mean is not None and running_var is not None and not training:
        # Running statistics: shared by every step (per_step too), or one row per step (BNTT).
        mean, var = _laid_over(running_mean, input, channel, time), _laid_over(running_var, input, channel, time)
    else:
        # Batch statistics over every dimension but the channels (and time, per step). The graph
        # computes the output only: running statistics are not updated.
        by_step = multi_step and (per_step or per_step_tensors)
        reduce = [d for d in range(input.dim()) if d != channel and not (by_step and d == time)]
        var, mean = torch.var_mean(input, reduce, correction=0, keepdim=True)
    output = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        output = output * _laid_over(weight, input, channel, time)
    if bias is not None:
        output = output + _laid_over(bias, input, channel, time)
    if scale is not None:  # TEBN: step t scaled by scale[t]
        shape = [1] * input.dim()
        shape[time] = -1
        output = output * scale.view(shape)
    return output.to(input.dtype)


@torch.jit.unused
def layer_norm(input: torch.Tensor, normalized_shape: List[int], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


@torch.jit.unused
def weight_standardize(weight: torch.Tensor, gamma: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None,
                       eps: float = 1e-6) -> torch.Tensor:
    """Per output channel over the other weight dimensions (fan_in values):
    ``(w - mean) / (sqrt(var_unbiased * fan_in) + eps) * gamma + beta``."""
    dims = list(range(1, weight.dim()))
    fan_in = weight[0].numel()
    var, mean = torch.var_mean(weight, dims, correction=1, keepdim=True)
    output = (weight - mean) / (torch.sqrt(var * fan_in) + eps)
    shape = [-1] + [1] * (weight.dim() - 1)
    if gamma is not None:
        output = output * gamma.view(shape)
    if beta is not None:
        output = output + beta.view(shape)
    return output
