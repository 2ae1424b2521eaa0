"""Synapses: layers that map spike trains to postsynaptic potentials.

Every built-in layer is a subclass of its torch.nn twin (same parameters, initialisation and
state_dict keys) whose forward is one ``torch.ops.matterhorn`` call in either mode: the C++ op
folds ``[T, B, ...]`` into one batched computation.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as distributed
import torch.nn as nn

from .. import _C
from . import _onnx
from .attention import MultiheadAttention
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            if self.batch_first:  # forward_steps always sees [T, B, ...]
                return self.forward_steps(input.transpose(0, 1)).transpose(0, 1)
            return self.forward_steps(input)
        return self.forward_step(input)


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
        spike_input: bool = False,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_step_mode(multi_time_step, batch_first)
        self.spike_input = _spike_input(type(self).__name__, spike_input)

    def forward_step(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward_steps(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # A per-position map: [T, B] or [B, T] order and the mode do not change the arithmetic.
        return self._linear_forward(input, self.weight)

    def _linear_forward(self, o: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The folded GEMM with ``weight`` (the layer's own, or one derived from it)."""
        if not torch.jit.is_scripting() and _onnx.exporting():
            return _onnx.linear(o, weight, self.bias)
        if self.spike_input:
            return torch.ops.matterhorn.spike_linear(o, weight, self.bias)
        return torch.ops.matterhorn.linear(o, weight, self.bias)


def _torch_twin(cls: type) -> type:
    """The torch.nn class a matterhorn layer extends (the first one in its MRO)."""
    return next(base for base in cls.__mro__ if base.__module__.startswith("torch.nn."))


def _check_sizes(layer: str, arguments: dict, names_and_minimums) -> None:
    """Sizes that torch.nn would turn into an obscure RuntimeError (or accept) become ValueErrors."""
    for name, minimum in names_and_minimums:
        value = arguments.get(name)
        if value is None or isinstance(value, str):
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < minimum for v in values):
            raise ValueError(f"{layer}: {name} must be an integer (or a tuple of them) >= {minimum}, got {value!r}")


def _spike_input(layer: str, value: bool) -> bool:
    """``spike_input=True``: the input is spikes (0 and 1), kept for backward as 1 bit per value by the
    ``spike_*`` ops (see docs/API.md "Spike input")."""
    if not isinstance(value, bool):
        raise TypeError(f"{layer}: spike_input must be a bool, got {value!r}")
    return value


class _TwinSynapse(Synapse):
    """A synapse that extends a torch.nn layer (its "twin"): the twin's constructor (the page's
    signature, positional order and defaults included) plus keyword-only extras."""

    _SIZES: tuple = ()  # (argument, minimum): sizes torch.nn would accept or fail on obscurely

    def _init_twin(self, multi_time_step: Optional[bool], batch_first: bool, **arguments) -> None:
        """Run the twin's constructor on checked ``arguments``, then set the mode."""
        _check_sizes(type(self).__name__, arguments, self._SIZES)
        try:
            _torch_twin(type(self)).__init__(self, **arguments)
        except ValueError as error:  # torch.nn's argument checks, prefixed with the layer
            raise ValueError(f"{type(self).__name__}: {error}") from None
        self._init_step_mode(multi_time_step, batch_first)


_Size = Union[int, Tuple[int, ...]]


class _ConvSynapse(_TwinSynapse):
    """Shared by Conv1d/2d/3d and ConvTranspose1d/2d/3d."""

    _SIZES = (("in_channels", 1), ("out_channels", 1), ("kernel_size", 1), ("stride", 1),
              ("padding", 0), ("dilation", 1), ("groups", 1), ("output_padding", 0))

    def _init_explicit_padding(self) -> None:
        """Explicit padding for the op: N values (both sides) or (before, after) pairs for 'same'."""
        if self.padding == "same":
            self.explicit_padding: List[int] = _C.same_padding(list(self.kernel_size), list(self.dilation))
        elif self.padding == "valid":
            self.explicit_padding = [0] * len(self.kernel_size)
        else:
            self.explicit_padding = list(self.padding)


class _ConvNd(_ConvSynapse):
    """Convolution over ``[T, B, C, ...]`` (one step: ``[B, C, ...]``) as one folded call. The
    rank tells the mode, so both ranks are accepted in either mode, and ``[B, T, ...]``
    (``batch_first``) folds the same way."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size,
        stride: _Size = 1,
        padding: Union[str, _Size] = 0,
        dilation: _Size = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        multi_time_step: Optional[bool] = None,
        batch_first: bool = False,
        spike_input: bool = False,
    ) -> None:
        self._init_twin(
            multi_time_step, batch_first, in_channels=in_channels, out_channels=out_channels,
            kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
            padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._init_explicit_padding()
        self.spike_input = _spike_input(type(self).__name__, spike_input)

    def forward_step(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward_steps(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight)

    def _conv_forward(self, o: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The folded convolution with ``weight`` (the layer's own, or one derived from it)."""
        if not torch.jit.is_scripting() and _onnx.exporting():
            return _onnx.conv(
                o, weight, self.bias, self.stride, self.explicit_padding, self.dilation, self.groups, self.padding_mode
            )
        if self.spike_input:
            return torch.ops.matterhorn.spike_conv(
                o, weight, self.bias, self.stride, self.explicit_padding, self.dilation, self.groups, self.padding_mode
            )
        return torch.ops.matterhorn.conv(
            o, weight, self.bias, self.stride, self.explicit_padding, self.dilation, self.groups, self.padding_mode
        )


class _ConvTransposeNd(_ConvSynapse):
    """Transposed convolution over ``[T, B, C, ...]`` (one step: ``[B, C, ...]``) as one folded
    call; ``output_size`` (spatial sizes or the whole output shape) picks ``output_padding``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size,
        stride: _Size = 1,
        padding: _Size = 0,
        output_padding: _Size = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: _Size = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        multi_time_step: Optional[bool] = None,
        batch_first: bool = False,
        spike_input: bool = False,
    ) -> None:
        self._init_twin(
            multi_time_step, batch_first, in_channels=in_channels, out_channels=out_channels,
            kernel_size=kernel_size, stride=stride, padding=padding, output_padding=output_padding, groups=groups,
            bias=bias, dilation=dilation, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._init_explicit_padding()
        self.spike_input = _spike_input(type(self).__name__, spike_input)

    def forward_step(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward_steps(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward(self, input: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        return self._conv_forward(input, self.weight, output_size)

    def _conv_forward(self, o: torch.Tensor, weight: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        """The folded transposed convolution with ``weight`` (the layer's own, or one derived from it)."""
        if not torch.jit.is_scripting() and _onnx.exporting():
            return _onnx.conv_transpose(
                o, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation,
                output_size,
            )
        if self.spike_input:
            return torch.ops.matterhorn.spike_conv_transpose(
                o, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation,
                output_size,
            )
        return torch.ops.matterhorn.conv_transpose(
            o, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation,
            output_size,
        )


class Conv1d(_ConvNd, nn.Conv1d):
    """1-D convolution synapse: ``[T, B, C_in, L] -> [T, B, C_out, L_out]``."""


class Conv2d(_ConvNd, nn.Conv2d):
    """2-D convolution synapse: ``[T, B, C_in, H, W] -> [T, B, C_out, H_out, W_out]``."""


class Conv3d(_ConvNd, nn.Conv3d):
    """3-D convolution synapse: ``[T, B, C_in, H, W, L] -> [T, B, C_out, H_out, W_out, L_out]``."""


class ConvTranspose1d(_ConvTransposeNd, nn.ConvTranspose1d):
    """1-D transposed convolution synapse: ``[T, B, C_in, L] -> [T, B, C_out, L_out]``."""


class ConvTranspose2d(_ConvTransposeNd, nn.ConvTranspose2d):
    """2-D transposed convolution synapse: ``[T, B, C_in, H, W] -> [T, B, C_out, H_out, W_out]``."""


class ConvTranspose3d(_ConvTransposeNd, nn.ConvTranspose3d):
    """3-D transposed convolution synapse: ``[T, B, C_in, H, W, L] -> [T, B, C_out, ...]``."""


class _WeightStandardized:
    """Weight standardisation (matterhorn 2.0.0's WS layers), mixed into our Linear and ConvNd:
    per output channel, over every other weight dimension (fan_in values),
    ``(w - mean(w)) / (sqrt(var_unbiased(w) * fan_in) + eps) * gamma + beta``, mean and variance
    constants to autograd. ``gamma`` (ones, trainable iff ``affine``) and ``beta`` (zeros, never
    trainable) have one value per output channel. The standardised weight comes from
    ``torch.ops.matterhorn.weight_standardize``, then the layer's folded op runs with it."""

    weight: torch.Tensor
    eps: float

    def _init_weight_standardization(self, affine: bool, eps: float, device, dtype) -> None:
        name = type(self).__name__
        if not isinstance(affine, bool):
            raise TypeError(f"{name}: affine must be a bool, got {affine!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"{name}: eps must be a number >= 0, got {eps!r}")
        fan_in = self.weight[0].numel() if self.weight.shape[0] else self.weight.shape[1:].numel()
        if fan_in == 1:
            raise ValueError(f"{name}: weight standardisation needs 2 or more weights per output channel (an "
                             f"unbiased variance); this layer's weight {list(self.weight.shape)} has 1")
        out = self.weight.shape[0]
        self.affine = affine
        self.eps = float(eps)
        self.gamma = nn.Parameter(torch.ones(out, device=device, dtype=dtype), requires_grad=affine)
        self.beta = nn.Parameter(torch.zeros(out, device=device, dtype=dtype), requires_grad=False)

    def standardized_weight(self) -> torch.Tensor:
        """The weight the layer computes with."""
        if not torch.jit.is_scripting() and _onnx.exporting():
            return _onnx.weight_standardize(self.weight, self.gamma, self.beta, self.eps)
        return torch.ops.matterhorn.weight_standardize(self.weight, self.gamma, self.beta, self.eps)

    def _check_input(self, input: torch.Tensor) -> None:
        """The input's dtype and device, in this layer's name (the folded op would name its base)."""
        name = type(self).__name__
        if input.dtype != self.weight.dtype:
            raise TypeError(f"{name}: the input's dtype {input.dtype} does not match the layer's weight dtype "
                            f"{self.weight.dtype}; cast the input or call .to({input.dtype}) on the layer")
        if input.device != self.weight.device:
            raise ValueError(f"{name}: the input is on {input.device} but the layer's weight is on "
                             f"{self.weight.device}; move one of them with .to(device)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", affine={self.affine}, eps={self.eps}"


class WSLinear(_WeightStandardized, Linear):
    """Linear with a standardised weight (see ``_WeightStandardized``): ``[T, B, ..., I] ->
    [T, B, ..., O]`` or ``[B, ..., I] -> [B, ..., O]``, one GEMM over every leading position."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        affine: bool = True,
        eps: float = 1e-6,
        device=None,
        dtype=None,
        *,
        multi_time_step: Optional[bool] = None,
        batch_first: bool = False,
        spike_input: bool = False,
    ) -> None:
        Linear.__init__(self, in_features, out_features, bias, device, dtype, multi_time_step=multi_time_step,
                        batch_first=batch_first, spike_input=spike_input)
        self._init_weight_standardization(affine, eps, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(input)
        return self._linear_forward(input, self.standardized_weight())


class _WSConvNd(_WeightStandardized):
    """WSConv1d/2d/3d: a convolution (``[T, B, C, ...]`` or one step ``[B, C, ...]``) with a
    standardised weight (see ``_WeightStandardized``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size,
        stride: _Size = 1,
        padding: Union[str, _Size] = 0,
        dilation: _Size = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        affine: bool = True,
        eps: float = 1e-6,
        device=None,
        dtype=None,
        *,
        multi_time_step: Optional[bool] = None,
        batch_first: bool = False,
        spike_input: bool = False,
    ) -> None:
        _ConvNd.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype, multi_time_step=multi_time_step, batch_first=batch_first, spike_input=spike_input,
        )
        self._init_weight_standardization(affine, eps, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(input)
        return self._conv_forward(input, self.standardized_weight())


class WSConv1d(_WSConvNd, Conv1d):
    """1-D convolution synapse with a standardised weight: ``[T, B, C_in, L] -> [T, B, C_out, L_out]``."""


class WSConv2d(_WSConvNd, Conv2d):
    """2-D convolution synapse with a standardised weight: ``[T, B, C_in, H, W] -> [T, B, C_out, H_out, W_out]``."""


class WSConv3d(_WSConvNd, Conv3d):
    """3-D convolution synapse with a standardised weight: ``[T, B, C_in, H, W, L] -> [T, B, C_out, ...]``."""


class _BatchNorm(_TwinSynapse):
    """BatchNorm over ``[T, B, C, ...]``: per-channel statistics over T, B and every spatial
    position (torch.nn's BatchNormNd on the folded ``[T*B, C, ...]`` tensor), running statistics
    updated once per call. ``per_step=True``: statistics over B and space for each time step,
    shared affine, running statistics updated once per time step in time order (exactly a loop
    of torch.nn BatchNormNd calls over t). Single-step input ``[B, C, ...]`` is torch.nn's."""

    _SIZES = (("num_features", 1),)
    _DIMS = 0  # spatial dimensions of the torch.nn twin: 1, 2 or 3

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        multi_time_step: Optional[bool] = None,
        batch_first: bool = False,
        per_step: bool = False,
        sync: bool = False,
        process_group: Optional[object] = None,
    ) -> None:
        self._init_twin(
            multi_time_step, batch_first, num_features=num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, device=device, dtype=dtype, bias=bias,
        )
        if not isinstance(per_step, bool):
            raise TypeError(f"{type(self).__name__}: per_step must be a bool, got {per_step!r}")
        self.dims: int = self._DIMS
        self.per_step = per_step
        # sync: statistics over every process of process_group (None: the default group) in training.
        self.sync = sync
        self.process_group = process_group

    def forward_step(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward_steps(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.sync and self.training and self._synchronising():
            return self._forward_synchronised(input)
        track = self.training and self.track_running_stats
        use_running = not self.training or self.track_running_stats
        if not torch.jit.is_scripting() and _onnx.exporting():
            return _onnx.batch_norm(
                input, self.weight, self.bias,
                self.running_mean if use_running else None, self.running_var if use_running else None, None,
                self.training, self.momentum, self.eps, self.num_features, self.dims, self.step_mode == "m",
                self.per_step, self.batch_first,
            )
        return torch.ops.matterhorn.batch_norm(
            input, self.weight, self.bias,
            self.running_mean if use_running else None, self.running_var if use_running else None,
            self.num_batches_tracked if track else None,
            self.training, self.momentum, self.eps, self.num_features, self.dims, self.step_mode == "m",
            self.per_step, self.batch_first,
        )

    @torch.jit.unused
    def _synchronising(self) -> bool:
        return distributed.is_available() and distributed.is_initialized() and \
            distributed.get_world_size(self.process_group) > 1

    @torch.jit.unused
    def _forward_synchronised(self, o: torch.Tensor) -> torch.Tensor:
        multi_step = o.dim() == 4 or (o.dim() == 3 and self.step_mode == "m") if self.dims == 1 else o.dim() == self.dims + 3
        per_step = self.per_step and multi_step
        time_major = not (per_step and self.batch_first)
        steps = o if time_major else o.transpose(0, 1).contiguous()
        output = _SynchronisedBatchNorm.apply(
            steps.flatten(0, 1) if multi_step else steps, self.weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked if self.track_running_stats else None, self.momentum, self.eps,
            steps.shape[0] if per_step else 1, self.process_group,
        )
        output = output.unflatten(0, steps.shape[:2]) if multi_step else output
        return output if time_major else output.transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        return super().extra_repr() + (", per_step=True" if self.per_step else "") + (", sync=True" if self.sync else "")


class _SynchronisedBatchNorm(torch.autograd.Function):
    """BatchNorm whose statistics cover the whole process group: the local moments are gathered
    and merged (Chan's formula), the two backward reductions are all-reduced. Any backend, gloo
    on CPU included. Parameter gradients stay local, as in torch.nn.SyncBatchNorm: DDP (or an
    all_reduce) sums them across processes."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, groups, group):
        mean, var = torch.ops.matterhorn.batch_norm_stats(x, groups)  # this process: [G, C]
        accumulate = mean.dtype  # float32, or float64 for float64 input
        local = torch.stack([torch.full_like(mean, x.numel() // mean.numel()), mean, var]).double()
        gathered = [torch.empty_like(local) for _ in range(distributed.get_world_size(group))]
        distributed.all_gather(gathered, local, group=group)
        counts, means, variances = torch.stack(gathered).unbind(1)  # [processes, G, C] each
        count = counts.sum(0)
        mean = (counts * means).sum(0) / count
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / count
        mean, var = mean.to(accumulate), var.to(accumulate)
        if running_mean is not None and running_var is not None:
            torch.ops.matterhorn.batch_norm_update_stats(
                mean, var, int(count[0, 0]), running_mean, running_var, num_batches_tracked, momentum)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.groups, ctx.group, ctx.count, ctx.has_bias = eps, groups, group, int(count[0, 0]), bias is not None
        return torch.ops.matterhorn.batch_norm_elemt(x, mean, var, weight, bias, eps, groups)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, mean, var = ctx.saved_tensors
        sum_dy, sum_dy_xmu = torch.ops.matterhorn.batch_norm_backward_reduce(grad_output, x, mean, ctx.groups)
        grad_weight = (sum_dy_xmu * (var + ctx.eps).rsqrt()).sum(0).to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.sum(0).to(weight.dtype) if ctx.has_bias else None
        sums = torch.stack([sum_dy, sum_dy_xmu])
        distributed.all_reduce(sums, group=ctx.group)
        grad_input = torch.ops.matterhorn.batch_norm_backward_elemt(
            grad_output, x, mean, var, weight, sums[0], sums[1], ctx.eps, ctx.count, ctx.groups)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Make every matterhorn BatchNorm in ``module`` synchronise its statistics across the
    processes of ``process_group`` (None: the default group) in training. Returns ``module``."""
    for child in module.modules():
        if isinstance(child, _BatchNorm):
            child.sync = True
            child.process_group = process_group
    return module


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """BatchNorm over ``[T, B, C]`` or ``[T, B, C, L]`` (single-step ``[B, C]`` or ``[B, C, L]``).
    A 3-D input is read by the mode: ``[T, B, C]`` in multi-step, ``[B, C, L]`` in single-step."""

    _DIMS = 1


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """BatchNorm over ``[T, B, C, H, W]`` (single-step ``[B, C, H, W]``)."""

    _DIMS = 2


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """BatchNorm over ``[T, B, C, H, W, L]`` (single-step ``[B, C, H, W, L]``)."""

    _DIMS = 3


class LayerNorm(_TwinSynapse, nn.LayerNorm):
    """LayerNorm over the trailing ``normalized_shape``: ``[T, B, ..., *shape]`` or
    ``[B, ..., *shape]``, the same in both modes (one call over every leading position)."""

    def __init__(
        self,
        normalized_shape: Union[int, List[int], torch.Size],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        multi_time_step: Optional[bool] = None,
        batch_first: bool = False,
    ) -> None:
        self._init_twin(
            multi_time_step, batch_first, normalized_shape=normalized_shape, eps=eps,
            elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype,
        )

    def forward_step(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward_steps(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and _onnx.exporting():
            return _onnx.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return torch.ops.matterhorn.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


__all__ = ["Synapse", "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "WSLinear", "WSConv1d", "WSConv2d", "WSConv3d",
           "convert_sync_batchnorm", "MultiheadAttention"]
