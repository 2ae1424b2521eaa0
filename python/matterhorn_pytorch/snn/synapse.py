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
from .skeleton import Module, dtype_remedy


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
                            f"{self.weight.dtype}; {dtype_remedy(input.dtype, self.weight.dtype, 'input')}")
        if input.device != self.weight.device:
            raise ValueError(f"{name}: the input is on {input.device} but the layer's weight is on "
                             f"{self.weight.device}; move one of them with .to(device)")

    @torch.jit.unused
    def _forward_in_layer_name(self, input: torch.Tensor) -> torch.Tensor:
        """forward outside TorchScript (``_standardized_forward``: the layer's): the input checked, and
        the folded op's errors, which name the base layer ("Conv2d(in_channels=3): ...", "Linear: ..."),
        raised again in this layer's name."""
        self._check_input(input)
        try:
            return self._standardized_forward(input)
        except (ValueError, TypeError) as error:
            base, message = _torch_twin(type(self)).__name__, str(error)
            named = message.startswith(base) and message[len(base):len(base) + 1] in (":", "(")
            if type(error) not in (ValueError, TypeError) or not named:
                raise
            raise type(error)(type(self).__name__ + message[len(base):]) from None

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
            return self._forward_in_layer_name(input)
        return self._standardized_forward(input)

    def _standardized_forward(self, input: torch.Tensor) -> torch.Tensor:
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
            return self._forward_in_layer_name(input)
        return self._standardized_forward(input)

    def _standardized_forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.standardized_weight())


class WSConv1d(_WSConvNd, Conv1d):
    """1-D convolution synapse with a standardised weight: ``[T, B, C_in, L] -> [T, B, C_out, L_out]``."""


class WSConv2d(_WSConvNd, Conv2d):
    """2-D convolution synapse with a standardised weight: ``[T, B, C_in, H, W] -> [T, B, C_out, H_out, W_out]``."""


class WSConv3d(_WSConvNd, Conv3d):
    """3-D convolution synapse with a standardised weight: ``[T, B, C_in, H, W, L] -> [T, B, C_out, ...]``."""


def _member(module: nn.Module, name: str):
    """``module.<name>`` read from its parameter or buffer dict when it is there, skipping
    Module.__getattr__'s search, a visible share of a small layer's eager call. Otherwise (a
    parametrization, a plain tensor attribute) the attribute itself."""
    parameters, buffers = module._parameters, module._buffers
    if name in parameters:
        return parameters[name]
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


class _BatchNorm(_TwinSynapse):
    """BatchNorm over ``[T, B, C, ...]``: per-channel statistics over T, B and every spatial
    position (torch.nn's BatchNormNd on the folded ``[T*B, C, ...]`` tensor), running statistics
    updated once per call. ``per_step=True``: statistics over B and space for each time step,
    shared affine, running statistics updated once per time step in time order (exactly a loop
    of torch.nn BatchNormNd calls over t). Single-step input ``[B, C, ...]`` is torch.nn's."""

    _SIZES = (("num_features", 1),)
    _DIMS = 0  # spatial dimensions of the torch.nn twin: 1, 2 or 3
    _NAME = ""  # the class's name in messages, e.g. "BatchNorm2d"

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
        self.layer_name: str = self._NAME  # names the layer in the op's messages; ends in its 1d/2d/3d
        self.per_step = per_step
        # sync: statistics over every process of process_group (None: the default group) in training.
        self.sync = sync
        self.process_group = process_group

    def forward_step(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward_steps(self, o: torch.Tensor) -> torch.Tensor:
        return self.forward(o)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._normalize(input, None)

    def _normalize(self, input: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer op (ops/batch_norm_layer.cpp decides fold and groups); ``scale``: TEBN's."""
        if not torch.jit.is_scripting():
            return self._eager_normalize(input, scale)
        track = self.training and self.track_running_stats
        use_running = not self.training or self.track_running_stats
        return torch.ops.matterhorn.batch_norm_layer(
            input, self.weight, self.bias,
            self.running_mean if use_running else None, self.running_var if use_running else None,
            self.num_batches_tracked if track else None,
            self.training, self.momentum, self.eps, self.layer_name, self.num_features, self.step_mode == "m",
            self.per_step, self.batch_first, scale,
        )

    @torch.jit.unused
    def _eager_normalize(self, input: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        training = self.training
        if self.sync and training and self._synchronising():
            return self._forward_synchronised(input, scale)
        use_running = not training or self.track_running_stats
        running_mean = _member(self, "running_mean") if use_running else None
        running_var = _member(self, "running_var") if use_running else None
        weight, bias = _member(self, "weight"), _member(self, "bias")
        if _onnx.exporting():
            return _onnx.batch_norm(
                input, weight, bias, running_mean, running_var, None, training,
                self.momentum, self.eps, self.layer_name, self.num_features, self.step_mode == "m", self.per_step,
                self.batch_first, scale,
            )
        return torch.ops.matterhorn.batch_norm_layer(
            input, weight, bias, running_mean, running_var,
            _member(self, "num_batches_tracked") if training and self.track_running_stats else None,
            training, self.momentum, self.eps, self.layer_name, self.num_features, self.step_mode == "m",
            self.per_step, self.batch_first, scale,
        )

    @torch.jit.unused
    def _synchronising(self) -> bool:
        return distributed.is_available() and distributed.is_initialized() and \
            distributed.get_world_size(self.process_group) > 1

    @torch.jit.unused
    def _forward_synchronised(self, o: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        # the layer op's fold (ops/batch_norm_layer.cpp), around statistics over the process group
        layout = (self.layer_name, self.num_features, self.step_mode == "m", self.per_step, self.batch_first,
                  self.weight, self.running_mean, scale)
        folded, groups = torch.ops.matterhorn.batch_norm_layer_fold(o, *layout)
        output = _SynchronisedBatchNorm.apply(
            folded, self.weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked if self.track_running_stats else None, self.momentum, self.eps,
            groups, scale, self.process_group,
        )
        return torch.ops.matterhorn.batch_norm_layer_unfold(output, o, *layout)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", per_step=True" if self.per_step else "") + (", sync=True" if self.sync else "")


class _SynchronisedBatchNorm(torch.autograd.Function):
    """BatchNorm whose statistics cover the whole process group: the local moments are gathered
    and merged (Chan's formula, weighted by each process's count; an empty shard counts 0), the
    two backward reductions are all-reduced. Any backend, gloo on CPU included. Parameter
    gradients stay local, as in torch.nn.SyncBatchNorm: DDP (or an all_reduce) sums them across
    processes. ``groups`` and ``scale`` as the core op ``matterhorn::batch_norm``'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, groups, scale,
                group):
        mean, var = torch.ops.matterhorn.batch_norm_stats(x, groups)  # this process: [G, C]
        accumulate = mean.dtype  # float32, or float64 for float64 input
        local = torch.stack([torch.full_like(mean, x.numel() // max(mean.numel(), 1)), mean, var]).double()
        gathered = [torch.empty_like(local) for _ in range(distributed.get_world_size(group))]
        distributed.all_gather(gathered, local, group=group)
        counts, means, variances = torch.stack(gathered).unbind(1)  # [processes, G, C] each
        # an empty shard's statistics are NaN: weighted by 0 they would still poison the sums
        means, variances = (torch.where(counts > 0, t, torch.zeros_like(t)) for t in (means, variances))
        count = counts.sum(0)
        mean = (counts * means).sum(0) / count
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / count
        mean, var = mean.to(accumulate), var.to(accumulate)
        if running_mean is not None and running_var is not None:
            torch.ops.matterhorn.batch_norm_update_stats(
                mean, var, int(count[0, 0]), running_mean, running_var, num_batches_tracked, momentum)
        ctx.save_for_backward(x, weight, bias, scale, mean, var)
        ctx.eps, ctx.groups, ctx.group, ctx.count = eps, groups, group, int(count[0, 0])
        steps = groups if scale is None else scale.shape[0]
        return torch.ops.matterhorn.batch_norm_elemt(x, mean, var, weight, bias, eps, steps, scale)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, scale, mean, var = ctx.saved_tensors
        steps = ctx.groups if scale is None else scale.shape[0]
        sum_dy, sum_dy_xmu = torch.ops.matterhorn.batch_norm_backward_reduce(grad_output, x, mean, steps)
        invstd = (var + ctx.eps).rsqrt()
        grad_scale = None
        if scale is not None:  # y = (xhat * w + b) * scale[t]
            per_value = sum_dy_xmu * invstd * (weight if weight is not None else 1.0)
            grad_scale = (per_value + (sum_dy * bias if bias is not None else 0.0)).sum(1).to(scale.dtype)
            factor = scale.to(sum_dy.dtype)[:, None]
            sum_dy, sum_dy_xmu = sum_dy * factor, sum_dy_xmu * factor

        def like(t, parameter):  # [steps, C] -> the parameter's shape ([C]: summed over the steps)
            return None if parameter is None else (t.sum(0) if parameter.dim() == 1 else t).to(parameter.dtype)

        grad_weight, grad_bias = like(sum_dy_xmu * invstd, weight), like(sum_dy, bias)
        sums = torch.stack([sum_dy, sum_dy_xmu])
        if mean.shape[0] == 1 and steps > 1:  # statistics over every step: their sums too
            sums = sums.sum(1, keepdim=True)
        distributed.all_reduce(sums, group=ctx.group)
        grad_input = torch.ops.matterhorn.batch_norm_backward_elemt(
            grad_output, x, mean, var, weight, sums[0], sums[1], ctx.eps, ctx.count, steps, scale)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, grad_scale, None


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
    _NAME = "BatchNorm1d"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """BatchNorm over ``[T, B, C, H, W]`` (single-step ``[B, C, H, W]``)."""

    _DIMS = 2
    _NAME = "BatchNorm2d"


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """BatchNorm over ``[T, B, C, H, W, L]`` (single-step ``[B, C, H, W, L]``)."""

    _DIMS = 3
    _NAME = "BatchNorm3d"


def _steps(layer: str, T: int) -> int:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"{layer}: T (time steps) must be an integer >= 1, got {T!r}")
    return T


class _TemporalBatchNorm(_BatchNorm):
    """The temporal normalizations (SpikingJelly's layers, not in matterhorn 2.0.0): multi-step
    layers on BatchNorm's core, SpikingJelly's positional order. ``[T, B, C, ...]`` (``[B, T, C, ...]``
    with batch_first)."""

    def _init_temporal(self, num_features: int, eps: float, momentum: Optional[float], affine: bool,
                       track_running_stats: bool, device, dtype, batch_first: bool, sync: bool,
                       process_group: Optional[object], bias: bool = True, per_step: bool = False) -> None:
        _BatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                            batch_first=batch_first, per_step=per_step, sync=sync, process_group=process_group)

    _MULTI_STEP_ONLY = "it normalizes over time"


class _ThresholdDependentBatchNorm(_TemporalBatchNorm):
    """tdBN: BatchNorm over T, B and space with the weight initialised to ``alpha * v_th``."""

    def __init__(
        self,
        alpha: float,
        v_th: float,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        batch_first: bool = False,
        sync: bool = False,
        process_group: Optional[object] = None,
    ) -> None:
        self._init_temporal(num_features, eps, momentum, affine, track_running_stats, device, dtype, batch_first, sync,
                            process_group)
        self.alpha, self.v_th = float(alpha), float(v_th)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.affine and hasattr(self, "v_th"):  # torch.nn's constructor calls this before alpha and v_th exist
            nn.init.constant_(self.weight, self.alpha * self.v_th)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, v_th={self.v_th}, " + super().extra_repr()


class _TemporalEffectiveBatchNorm(_TemporalBatchNorm):
    """TEBN: BatchNorm over T, B and space, then each step t scaled by a learnable ``scale[t]``
    (shape ``[T]``, ones), inside the kernels' element pass. Input of another T is an error."""

    def __init__(
        self,
        T: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        batch_first: bool = False,
        sync: bool = False,
        process_group: Optional[object] = None,
    ) -> None:
        self._init_temporal(num_features, eps, momentum, affine, track_running_stats, device, dtype, batch_first, sync,
                            process_group)
        self.T = _steps(type(self).__name__, T)
        self.scale = nn.Parameter(torch.ones(T, device=device, dtype=dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # the parameter from its dict, as _eager_normalize reads the others
            return self._eager_normalize(input, _member(self, "scale"))
        return self._normalize(input, self.scale)

    def extra_repr(self) -> str:
        return f"T={self.T}, " + super().extra_repr()


class _BatchNormThroughTime(_TemporalBatchNorm):
    """BNTT: statistics per time step, a weight per step (``[T, C]``, no bias) and running
    statistics per step (``[T, C]``); eval normalizes step t with step t's running statistics."""

    def __init__(
        self,
        T: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        batch_first: bool = False,
        sync: bool = False,
        process_group: Optional[object] = None,
    ) -> None:
        self._init_temporal(num_features, eps, momentum, affine, track_running_stats, device, dtype, batch_first, sync,
                            process_group, bias=False, per_step=True)
        self.T = _steps(type(self).__name__, T)
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(T, num_features, **factory))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(T, num_features, **factory))
            self.register_buffer("running_var", torch.ones(T, num_features, **factory))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self._normalize(input, None)  # the op checks the rank first
        # without weight and running statistics no per-step tensor shows the op the layer's T
        steps = input.shape[1 if self.batch_first else 0]
        if steps != self.T and self.weight is None and self.running_mean is None:  # cheap test first
            raise ValueError(f"{self.layer_name}: expected T = {self.T} time steps (the layer's T), got {steps} "
                             f"in input {list(input.shape)}" + (" (batch_first: [B, T, ...])" if self.batch_first else ""))
        return output

    def extra_repr(self) -> str:
        return f"T={self.T}, " + super().extra_repr()


class ThresholdDependentBatchNorm1d(_ThresholdDependentBatchNorm, BatchNorm1d):
    """tdBN over ``[T, B, C, ...]``: BatchNorm1d with the weight initialised to ``alpha * v_th``."""

    _NAME = "ThresholdDependentBatchNorm1d"


class TemporalEffectiveBatchNorm1d(_TemporalEffectiveBatchNorm, BatchNorm1d):
    """TEBN over ``[T, B, C, ...]``: BatchNorm1d, then step t times ``scale[t]``."""

    _NAME = "TemporalEffectiveBatchNorm1d"


class BatchNormThroughTime1d(_BatchNormThroughTime, BatchNorm1d):
    """BNTT over ``[T, B, C, ...]``: per-step statistics, weight and running statistics."""

    _NAME = "BatchNormThroughTime1d"


class ThresholdDependentBatchNorm2d(_ThresholdDependentBatchNorm, BatchNorm2d):
    """tdBN over ``[T, B, C, H, W]``: BatchNorm2d with the weight initialised to ``alpha * v_th``."""

    _NAME = "ThresholdDependentBatchNorm2d"


class TemporalEffectiveBatchNorm2d(_TemporalEffectiveBatchNorm, BatchNorm2d):
    """TEBN over ``[T, B, C, H, W]``: BatchNorm2d, then step t times ``scale[t]``."""

    _NAME = "TemporalEffectiveBatchNorm2d"


class BatchNormThroughTime2d(_BatchNormThroughTime, BatchNorm2d):
    """BNTT over ``[T, B, C, H, W]``: per-step statistics, weight and running statistics."""

    _NAME = "BatchNormThroughTime2d"


class ThresholdDependentBatchNorm3d(_ThresholdDependentBatchNorm, BatchNorm3d):
    """tdBN over ``[T, B, C, H, W, L]``: BatchNorm3d with the weight initialised to ``alpha * v_th``."""

    _NAME = "ThresholdDependentBatchNorm3d"


class TemporalEffectiveBatchNorm3d(_TemporalEffectiveBatchNorm, BatchNorm3d):
    """TEBN over ``[T, B, C, H, W, L]``: BatchNorm3d, then step t times ``scale[t]``."""

    _NAME = "TemporalEffectiveBatchNorm3d"


class BatchNormThroughTime3d(_BatchNormThroughTime, BatchNorm3d):
    """BNTT over ``[T, B, C, H, W, L]``: per-step statistics, weight and running statistics."""

    _NAME = "BatchNormThroughTime3d"


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
        if len(self.normalized_shape) == 0:  # torch.nn's forward refuses it
            raise ValueError("LayerNorm: normalized_shape must hold at least one size, got []")

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
           "ThresholdDependentBatchNorm1d", "ThresholdDependentBatchNorm2d", "ThresholdDependentBatchNorm3d",
           "TemporalEffectiveBatchNorm1d", "TemporalEffectiveBatchNorm2d", "TemporalEffectiveBatchNorm3d",
           "BatchNormThroughTime1d", "BatchNormThroughTime2d", "BatchNormThroughTime3d",
           "convert_sync_batchnorm", "MultiheadAttention"]
