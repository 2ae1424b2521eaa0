"""Property-based fuzz cases: every layer and every public op, on drawn shapes (zero sizes
included), dtypes, layouts, devices (cpu, meta) and argument values. Each call either raises a
clean error (ValueError / TypeError / RuntimeError / IndexError, a message naming the layer) or
equals torch.nn on the folded tensor (ops: a float64 plain-torch reference), within bounds that
follow from the arithmetic (fuzz_strategies).

These run only in a child process started by tests/test_fuzz.py (MATTERHORN_FUZZ_CHILD=1), so that
a crash fails a test instead of killing the run; in the parent they are not collected.
"""

import copy
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import matterhorn_pytorch as mth  # noqa: F401 - registers torch.ops.matterhorn
from fuzz_strategies import (ALLOWED, FLOATS, LAYOUTS, NON_FLOATS, Raised, assert_close_bound, bilinear_bounds,
                             check_clean_error, describe, finfo_eps, make_tensor, normalization_bound, outcome,
                             record, seeds)

CHILD = os.environ.get("MATTERHORN_FUZZ_CHILD") == "1"
ops = torch.ops.matterhorn
pytestmark = pytest.mark.filterwarnings("ignore")


def case(f):
    """A fuzz case: collected only in the child process (see the module docstring)."""
    f.__test__ = CHILD
    return f


def draw_dtype(data, label):
    """Mostly floating dtypes; one draw in ten an integer or bool dtype."""
    if data.draw(st.integers(0, 9), label=f"{label} kind") == 0:
        return data.draw(st.sampled_from(NON_FLOATS), label=label)
    return data.draw(st.sampled_from(FLOATS), label=label)


def u_of(*dtypes):
    """The coarsest eps among the floating dtypes involved."""
    return max(finfo_eps(d) for d in dtypes if d.is_floating_point)


def draw_device(data, cpu=3):
    """cpu (`cpu` draws in cpu + 3); meta (layer and input); or a mix (which must be a clean error)."""
    return data.draw(st.sampled_from(["cpu"] * cpu + ["meta", "meta-input", "meta-layer"]), label="device")


def valid_draws(spike_input):
    """How many draws (of 7 others) give a layer property's input the layer's dtype, and of 3 others
    the CPU: spike_input runs mostly such inputs, on which the spike path runs to its end (the dense
    properties draw the errors)."""
    return 12 if spike_input else 3


def place(module, device):
    return module.to("meta") if device in ("meta", "meta-layer") else module


def input_device(device):
    return "meta" if device in ("meta", "meta-input") else "cpu"


def randomize_parameters(module, seed):
    """Non-trivial affine parameters and running statistics, so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and t.numel():
                values = torch.rand(t.shape, generator=g, dtype=torch.float64)
                if name.endswith("running_var") or name.endswith("weight") and "Norm" in type(module).__name__:
                    values = values + 0.5
                else:
                    values = values * 2 - 1
                t.copy_(values.to(t.dtype))


def twin_copy(ours, twin_cls, dtype=None):
    """A plain torch.nn module with the same constructor state and tensors as ours."""
    ref = twin_cls.__new__(twin_cls)
    ref.__dict__ = copy.deepcopy({k: v for k, v in ours.__dict__.items()})
    return ref.to(dtype) if dtype is not None else ref


def torch_twin(cls):
    return next(base for base in cls.__mro__ if base.__module__.startswith("torch.nn."))


def leading_shape(data, multi_step, smallest=0):
    if multi_step:
        return [data.draw(st.integers(smallest, 3), label="T"), data.draw(st.integers(smallest, 3), label="B")]
    return [data.draw(st.integers(smallest, 3), label="B")]


# ---- the common layer property -------------------------------------------------------------------

def check_layer(ours, ref_d, x, *, name, run_ref, layer_dtype, must_raise_reason=None, device="cpu",
                compare=None, folded=None, norm=False, not_spikes=False):
    """ours(x) against torch.nn's verdict: ref_d (the twin, same dtype and device) run by run_ref.
    Raises where torch.nn raises (or must_raise_reason says the API forbids the input), else the
    same shape and dtype, and on the CPU the values, gradients and state checked by `compare`.
    An input dtype unlike the layer's (a normalization also takes float16/bfloat16 beside float32)
    must raise, and a TypeError when it is the only thing wrong (torch.nn takes the input cast).
    not_spikes: a spike_input=True layer recording a graph on an input with a value other than 0
    and 1, which must be a ValueError (docs/API.md "Spike input") where nothing else is wrong."""
    record(f"{name}: {ours!r}, device {device}, training={ours.training}\n  input {describe(x)}")
    has_tensors = any(True for _ in ref_d.parameters()) or any(t is not None for t in ref_d.buffers())
    if device in ("meta-input", "meta-layer") and has_tensors:
        must_raise_reason = must_raise_reason or "meta tensors mixed with cpu ones"
    dtype_ok = not has_tensors or x.dtype == layer_dtype or (norm and layer_dtype == torch.float32
                                          and x.dtype in (torch.float16, torch.bfloat16))
    type_error = False
    if x.dtype in NON_FLOATS and must_raise_reason is None:  # whatever torch.nn does (an empty input passes)
        must_raise_reason = "an integer or bool input"
        type_error = not isinstance(outcome(lambda: run_ref(copy.deepcopy(ref_d), x.detach().to(layer_dtype))), Raised)
    if not dtype_ok and must_raise_reason is None:
        must_raise_reason = f"an input of dtype {x.dtype} to a {layer_dtype} layer"
        type_error = not isinstance(outcome(lambda: run_ref(copy.deepcopy(ref_d), x.detach().to(layer_dtype))), Raised)
    expected = outcome(lambda: run_ref(ref_d, x)) if must_raise_reason is None else None
    result = outcome(lambda: ours(x))
    user_shape = list(x.shape)
    folded_shape = folded(x) if folded else None
    if must_raise_reason is None and not isinstance(expected, Raised) and not_spikes and device == "cpu":
        check_not_spikes(result, name)
        return None
    if must_raise_reason is not None or isinstance(expected, Raised):
        why = must_raise_reason or f"torch.nn {expected!r}"
        assert isinstance(result, Raised), f"{why}, but {name} returned {describe(result)}"
        check_clean_error(result, name, user_shape, folded_shape, (TypeError,) if type_error else ALLOWED)
        return None
    assert not isinstance(result, Raised), f"torch.nn returns {describe(expected)}, but {name} {result!r}"
    assert result.shape == expected.shape and result.dtype == expected.dtype and result.device == expected.device, \
        f"{name} returned {describe(result)}, torch.nn {describe(expected)}"
    if device == "cpu" and compare is not None:
        compare(result)
    return result


def grad_output_like(y, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)


# ---- spike input (docs/API.md "Spike input") -------------------------------------------------------

# Values written into a spike input: all but -0.0 (a zero) are non-spikes, and 1e-30 is one only
# where the dtype holds it (float16 rounds it to 0): the verdict reads the stored values.
NOT_SPIKES = [0.5, 2.0, -1.0, math.nan, math.inf, -math.inf, 1e-30, -0.0]


def holds_non_spikes(x):
    return x.device.type != "meta" and bool(((x != 0) & (x != 1)).any())


def draw_spikes(data, x):
    """x's values made 0 and 1 in place (its layout kept; the hidden half of a sliced buffer keeps
    its other values), and one draw in four a value of NOT_SPIKES written in. Whether x then holds
    a value other than 0 and 1."""
    if x.device.type != "meta":
        with torch.no_grad():
            x.copy_(x > 0)
            if x.is_floating_point() and x.numel() and data.draw(st.integers(0, 3), label="a non-spike?") == 0:
                k = data.draw(st.integers(0, x.numel() - 1), label="its position")
                x[torch.unravel_index(torch.tensor(k), x.shape)] = data.draw(st.sampled_from(NOT_SPIKES),
                                                                             label="non-spike value")
    return holds_non_spikes(x)


def check_not_spikes(result, name):
    """The error for a non-spike input to a spike op recording a graph: a ValueError naming the layer."""
    check_clean_error(result, name, types=(ValueError,))
    assert "spike_input=True expects an input of spikes" in str(result.error), result


def draw_spike_input(data, x, layer):
    """A spike_input=True layer's input: draw_spikes on x, then one draw in five no graph (the
    layer's parameters frozen, and the caller's input requiring no gradient), where nothing is
    checked and the layer is the dense one. Returns (x holds a non-spike, a graph is recorded)."""
    not_spikes = draw_spikes(data, x)
    graph = data.draw(st.integers(0, 4), label="graph?") > 0
    if not graph:
        layer.requires_grad_(False)
    return not_spikes, graph


def draw_spike_op_input(data, tensors):
    """A spike op's (input, weight, bias): draw_spikes on the input, and per floating tensor whether
    it requires a gradient; the op records a graph (packs the input, checks its values) where any
    does. Returns (the input holds a non-spike, a graph is recorded)."""
    not_spikes = draw_spikes(data, tensors[0])
    for k, t in enumerate(tensors):
        if t is not None and t.is_floating_point():
            t.requires_grad_(data.draw(st.booleans(), label=f"requires_grad {k}"))
    return not_spikes, any(t is not None and t.requires_grad for t in tensors)


def check_spike_op(result, dense_op, reference, tensors, seed, what, input_grad_exact=True):
    """A spike op's `result` on valid CPU (input, weight, bias), some requiring a gradient: the dense
    op's output bit for bit and, in float32/float64, its gradients (docs/API.md: the same ATen calls
    on the same values; input_grad_exact=False: a padding mode's input gradient, summed in another
    order), and each gradient within the sum bound of the float64 `reference` (unfolded input)."""
    twins = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors]
    dense = dense_op(*twins)
    # NaN where the dense op has NaN: no graph, no check, and a NaN or inf input value is the dense op's
    torch.testing.assert_close(result, dense, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: the output differs from the dense op's: {m}")
    wanted = [k for k, t in enumerate(tensors) if t is not None and t.requires_grad]
    if not wanted or result.dtype not in (torch.float32, torch.float64):
        return
    dy = grad_output_like(result, seed)
    got = torch.autograd.grad(result, [tensors[k] for k in wanted], dy, allow_unused=True)
    got_dense = torch.autograd.grad(dense, [twins[k] for k in wanted], dy, allow_unused=True)
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    expected = torch.autograd.grad(reference(*leaves64), [leaves64[k] for k in wanted], dy.double(), allow_unused=True)
    _, bounds = bilinear_bounds(reference, [None if t is None else t.detach() for t in leaves64], dy.double(),
                                u_of(result.dtype))
    present = [k for k, t in enumerate(tensors) if t is not None]
    for k, g, d, e in zip(wanted, got, got_dense, expected):
        g, d, e = (torch.zeros_like(tensors[k]) if v is None else v for v in (g, d, e))
        name = ["input", "weight", "bias"][k]
        assert_close_bound(g, e, bounds[present.index(k)], f"{what} grad of the {name}")
        if k or input_grad_exact:
            assert torch.equal(g, d), f"{what}: the gradient of the {name} differs from the dense op's"


# ---- Linear ---------------------------------------------------------------------------------------

@case
@given(data=st.data())
def test_linear_layer(data):
    linear_layer_case(data)


def linear_layer_case(data, spike_input=False):
    in_f, out_f = data.draw(st.integers(0, 5), label="in_features"), data.draw(st.integers(0, 5), label="out_features")
    bias = data.draw(st.booleans(), label="bias")
    layer_dtype = data.draw(st.sampled_from(FLOATS), label="layer dtype")
    dtype = data.draw(st.sampled_from([layer_dtype] * valid_draws(spike_input) + FLOATS + NON_FLOATS),
                      label="input dtype")
    device = draw_device(data, cpu=valid_draws(spike_input))
    lead = [data.draw(st.integers(0, 3), label="leading size") for _ in range(data.draw(st.integers(0, 3), label="rank-1"))]
    last = data.draw(st.sampled_from([in_f, in_f, in_f, in_f + 1]), label="last size")
    shape = lead + [last] if data.draw(st.integers(0, 19), label="0-D?") else []
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    seed = data.draw(seeds, label="seed")
    batch_first = data.draw(st.booleans(), label="batch_first")
    ours = mth.snn.Linear(in_f, out_f, bias, dtype=layer_dtype, batch_first=batch_first,
                          multi_time_step=data.draw(st.booleans(), label="multi_step"), spike_input=spike_input)
    randomize_parameters(ours, seed)
    ref_d = place(nn.Linear(in_f, out_f, bias, dtype=layer_dtype), device)
    ref_d.load_state_dict(ours.state_dict())
    ours = place(ours, device)
    x = make_tensor(shape, dtype, layout, input_device(device), seed)
    not_spikes, graph = draw_spike_input(data, x, ours) if spike_input else (False, True)
    requires_grad = dtype in (torch.float32, torch.float64) and dtype == layer_dtype and device == "cpu" and graph
    x = x.requires_grad_(requires_grad)

    def compare(y):
        w64 = ours.weight.detach().double()
        b64 = ours.bias.detach().double() if bias else None
        x64 = x.detach().double().requires_grad_()
        params64 = [w64.clone().requires_grad_(), None if b64 is None else b64.clone().requires_grad_()]
        y64 = F.linear(x64, *params64)
        u = u_of(dtype, layer_dtype)
        dy = grad_output_like(y, seed) if requires_grad else None
        bound, grad_bounds = bilinear_bounds(F.linear, [x64, w64, b64], None if dy is None else dy.double(), u)
        assert_close_bound(y, y64, bound, "Linear output")
        if dy is None:
            return
        y.backward(dy)
        expected = torch.autograd.grad(y64, [x64] + [p for p in params64 if p is not None], dy.double())
        actual = [x.grad, ours.weight.grad] + ([ours.bias.grad] if bias else [])
        for what, a, e, b in zip(["input", "weight", "bias"], actual, expected, grad_bounds):
            assert a is not None, f"Linear: no gradient for the {what}"
            assert_close_bound(a, e, b, f"Linear grad of {what}")

    check_layer(ours, ref_d, x, name="Linear", run_ref=lambda m, t: m(t), layer_dtype=layer_dtype, device=device,
                compare=compare, not_spikes=not_spikes and graph,
                must_raise_reason="a 0-D input" if not shape else None)


# ---- convolutions ----------------------------------------------------------------------------------

CONVS = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


@case
@given(data=st.data())
def test_conv_layers(data):
    conv_layer_case(data, data.draw(st.sampled_from(CONVS), label="layer"))


@case
@given(data=st.data())
def test_conv_layers_valid(data):
    """test_conv_layers on valid layers and non-empty CPU inputs only (its draws are mostly errors
    or empty tensors), every convolution layer in each example."""
    for name in CONVS:
        conv_layer_case(data, name, valid=True)


def conv_layer_case(data, name, spike_input=False, valid=False):
    """valid: arguments torch.nn takes and a non-empty input of the layer's dtype on the CPU."""
    transposed = name.startswith("ConvTranspose")
    dims = int(name[-2])

    def hostile(n):  # one draw in n a hostile choice
        return not valid and data.draw(st.integers(0, n - 1)) == 0

    groups = data.draw(st.sampled_from([1, 1, 2, 3]), label="groups")
    in_c = data.draw(st.integers(1, 4), label="in_channels") * (1 if hostile(5) else groups)
    out_c = data.draw(st.integers(1, 3), label="out_channels") * (1 if hostile(5) else groups)
    per_dim = lambda s, label: tuple(data.draw(s, label=f"{label}[{d}]") for d in range(dims))  # noqa: E731
    kernel = per_dim(st.integers(0, 3) if hostile(20) else st.integers(1, 3), "kernel")
    stride = per_dim(st.integers(0, 2) if hostile(20) else st.integers(1, 2), "stride")
    dilation = per_dim(st.integers(1, 2), "dilation")
    kwargs = dict(stride=stride, dilation=dilation, groups=groups, bias=data.draw(st.booleans(), label="bias"))
    if transposed:
        kwargs["padding"] = per_dim(st.integers(0, 2), "padding")
        kwargs["output_padding"] = tuple(  # valid: smaller than stride or dilation (torch.nn's rule)
            data.draw(st.integers(0, max(stride[d], dilation[d]) - 1 if valid else 1), label=f"output_padding[{d}]")
            for d in range(dims))
        widest_padding = max(kwargs["padding"])
    else:
        kwargs["padding"] = data.draw(st.sampled_from(["list", "list", "same", "valid"]), label="padding kind")
        if kwargs["padding"] == "list":
            kwargs["padding"] = per_dim(st.integers(-1, 2) if hostile(20) else st.integers(0, 2), "padding")
        kwargs["padding_mode"] = data.draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]),
                                           label="padding_mode")
        if valid and kwargs["padding"] == "same":  # torch.nn: 'same' only for stride 1
            kwargs["stride"] = stride = (1,) * dims
        widest_padding = max(kwargs["padding"]) if isinstance(kwargs["padding"], tuple) else \
            max(-(-d * (k - 1) // 2) for d, k in zip(dilation, kernel)) if kwargs["padding"] == "same" else 0
    layer_dtype = data.draw(st.sampled_from(FLOATS), label="layer dtype")
    dtype = layer_dtype if valid else data.draw(
        st.sampled_from([layer_dtype] * valid_draws(spike_input) + FLOATS + NON_FLOATS), label="input dtype")
    device = "cpu" if valid else draw_device(data, cpu=valid_draws(spike_input))
    multi = data.draw(st.booleans(), label="multi-step input")
    batch_first = data.draw(st.booleans(), label="batch_first")
    seed = data.draw(seeds, label="seed")
    cls = getattr(mth.snn, name)
    record(f"{name}({in_c}, {out_c}, {kernel}, **{kwargs})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin_made = outcome(lambda: getattr(nn, name)(in_c, out_c, kernel, **kwargs, dtype=layer_dtype))
        made = outcome(lambda: cls(in_c, out_c, kernel, **kwargs, dtype=layer_dtype, batch_first=batch_first,
                                   multi_time_step=multi if data.draw(st.booleans()) else None,
                                   spike_input=spike_input))
    if isinstance(made, Raised):
        # the API refuses sizes torch.nn accepts or rejects obscurely (docs/API.md): a ValueError then
        check_clean_error(made, name, types=ALLOWED if isinstance(twin_made, Raised) else (ValueError,))
        return
    assert not isinstance(twin_made, Raised), f"torch.nn.{name} {twin_made!r}, but ours was made"
    ours, ref_d = made, twin_made
    randomize_parameters(ours, seed)
    ref_d.load_state_dict(ours.state_dict())
    ref_d, ours = place(ref_d, device), place(ours, device)
    channels = in_c if valid else data.draw(st.sampled_from([in_c] * 5 + [in_c + 1]), label="input channels")
    if valid:  # the kernel fits, however padded; reflect needs padding < size; a transposed output is not empty
        spatial = [data.draw(st.integers(0, 2), label="spatial") + dilation[d] * (kernel[d] - 1) + 1
                   + 2 * widest_padding for d in range(dims)]
    else:
        spatial = [data.draw(st.integers(0, 5) if data.draw(st.integers(0, 9)) else st.integers(0, 1), label="spatial")
                   for _ in range(dims)]
    lead = leading_shape(data, multi, 1 if valid else 0)
    rank_change = 0 if valid else data.draw(st.sampled_from([0] * 9 + [-1, 1]), label="rank change")
    shape = lead + [channels] + spatial
    shape = shape[:-1] if rank_change < 0 else shape + [2] if rank_change > 0 else shape
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    x = make_tensor(shape, dtype, layout, input_device(device), seed, channel_dim=len(lead))
    not_spikes, graph = draw_spike_input(data, x, ours) if spike_input else (False, True)
    requires_grad = dtype in (torch.float32, torch.float64) and dtype == layer_dtype and device == "cpu" and graph
    x.requires_grad_(requires_grad)
    folds = x.dim() == dims + 3
    output_size = None
    if transposed and data.draw(st.integers(0, 3)) == 0:
        if valid:  # torch.nn's range: the smallest output plus [0, stride)
            output_size = [(spatial[d] - 1) * stride[d] - 2 * kwargs["padding"][d] + dilation[d] * (kernel[d] - 1) + 1
                           + data.draw(st.integers(0, stride[d] - 1)) for d in range(dims)]
        else:
            output_size = [s * st_ + data.draw(st.integers(-1, 1)) for s, st_ in zip(spatial, stride)]

    def run_ref(m, t):
        t = t.flatten(0, 1) if folds else t
        y = m(t, output_size) if transposed else m(t)
        return y.unflatten(0, x.shape[:2]) if folds else y

    def ours_call(t):
        return ours(t, output_size) if transposed else ours(t)

    def compare(y):
        ref64 = copy.deepcopy(ref_d).double()
        x64 = x.detach().double().requires_grad_()
        params = [ref64.weight, ref64.bias]

        def f(xx, w, b):  # the twin with these tensors as its parameters
            tensors = {"weight": w, **({"bias": b} if b is not None else {})}
            return run_ref(lambda *a: torch.func.functional_call(ref64, tensors, a), xx)

        y64 = run_ref(ref64, x64)
        u = u_of(dtype, layer_dtype)
        dy = grad_output_like(y, seed) if requires_grad else None
        bound, grad_bounds = bilinear_bounds(
            f, [x64, ref64.weight.detach(), None if ref64.bias is None else ref64.bias.detach()],
            None if dy is None else dy.double(), u)
        with torch.no_grad():
            twin = run_ref(ref_d, x.detach())
        if isinstance(outcome(lambda: assert_close_bound(twin, y64, bound, "")), Raised):
            # torch.nn's own result breaks the bound (its bfloat16 Conv3d on some CPUs and strides):
            # ours makes the same call, so it must be that result
            torch.testing.assert_close(y, twin, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
        else:
            assert_close_bound(y, y64, bound, f"{name} output")
        if dy is None:
            return
        y.backward(dy)
        expected = torch.autograd.grad(y64, [x64] + [p for p in params if p is not None], dy.double())
        actual = [x.grad, ours.weight.grad] + ([ours.bias.grad] if ours.bias is not None else [])
        for what, a, e, b in zip(["input", "weight", "bias"], actual, expected, grad_bounds):
            assert a is not None, f"{name}: no gradient for the {what}"
            assert_close_bound(a, e, b, f"{name} grad of {what}")

    wrong_rank = None if x.dim() in (dims + 1, dims + 2, dims + 3) else \
        "the API takes [T, B, C, ...], [B, C, ...] or unbatched [C, ...]"
    if wrong_rank is None and x.shape[-dims - 1] != in_c:  # torch.nn lets an empty input of any width through
        wrong_rank = "channels unlike in_channels"
    if transposed and wrong_rank is None and output_size is None and any(
            (x.shape[-dims + d] - 1) * stride[d] - 2 * kwargs["padding"][d] + dilation[d] * (kernel[d] - 1) + 1
            + kwargs["output_padding"][d] <= 0 for d in range(dims)):
        wrong_rank = "an empty output (docs/API.md: 'the output would be empty')"
    if transposed and wrong_rank is None and any(
            o >= s and o >= d for o, s, d in zip(kwargs["output_padding"], stride, dilation)):
        wrong_rank = "output_padding not smaller than stride or dilation (checked on empty inputs too)"
    if wrong_rank is None and 0 in x.shape[-dims:] and math.prod(x.shape[:-dims]) > 0:
        # torch.nn's CPU kernels refuse it (its meta kernels do not): every device refuses it here
        wrong_rank = "a spatial size of 0 beside a non-empty batch and channels"

    class Call:  # ours with output_size, under check_layer's name
        training = ours.training

        def __call__(self, t):
            return ours_call(t)

        def state_dict(self):
            return ours.state_dict()

        def __repr__(self):
            return f"{ours!r} output_size={output_size}"

    check_layer(Call(), ref_d, x, name=name, run_ref=run_ref, layer_dtype=layer_dtype, must_raise_reason=wrong_rank,
                device=device, not_spikes=not_spikes and graph,
                compare=compare, folded=(lambda t: list(t.flatten(0, 1).shape)) if folds else None)


# ---- BatchNorm ------------------------------------------------------------------------------------

def group_view(x64, groups):
    """[N, C, *S] -> [G, N/G, C, prod(S)] (zero sizes included)."""
    N, C = x64.shape[:2]
    return x64.reshape(groups, N // groups, C, math.prod(x64.shape[2:]))


def bn_statistics(x64, groups):
    """Per (group, channel) mean, biased variance and count of a folded float64 [N, C, ...] input,
    shaped to broadcast against [G, N/G, C, S]."""
    xg = group_view(x64, groups)
    count = xg.shape[1] * xg.shape[3]
    mean = xg.mean(dim=(1, 3), keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=(1, 3), keepdim=True)
    return xg, mean, var, count


@case
@given(data=st.data())
def test_batch_norm_layers(data):
    batch_norm_layer_case(data, data.draw(st.sampled_from(BATCH_NORMS), label="layer"))


@case
@given(data=st.data())
def test_batch_norm_layers_valid(data):
    """test_batch_norm_layers on eps > 0 and non-empty CPU inputs of the layer's rank and channels,
    two values or more per statistic (its draws are mostly errors or empty tensors), every
    BatchNorm in each example."""
    for name in BATCH_NORMS:
        batch_norm_layer_case(data, name, valid=True)


BATCH_NORMS = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def batch_norm_layer_case(data, name, valid=False):
    """valid: see test_batch_norm_layers_valid."""
    dims = int(name[-2])
    C = data.draw(st.integers(1, 4), label="num_features")
    kwargs = dict(
        eps=data.draw(st.sampled_from([1e-5, 1e-3, 0.5] if valid else [1e-5, 1e-5, 1e-3, 0.5, 0.0, -1e-3]),
                      label="eps"),
        momentum=data.draw(st.sampled_from([0.1, 0.1, None, 0.0, 1.0, 0.5]), label="momentum"),
        affine=data.draw(st.booleans(), label="affine"),
        track_running_stats=data.draw(st.booleans(), label="track_running_stats"))
    extras = dict(per_step=data.draw(st.booleans(), label="per_step"),
                  batch_first=data.draw(st.booleans(), label="batch_first"))
    mode = data.draw(st.sampled_from(["m", "s"]), label="step mode")
    training = data.draw(st.booleans(), label="training")
    layer_dtype = data.draw(st.sampled_from(FLOATS), label="layer dtype")
    dtype = layer_dtype if valid else data.draw(st.sampled_from([layer_dtype] * 3 + FLOATS + NON_FLOATS),
                                                label="input dtype")
    device = "cpu" if valid else draw_device(data)
    seed = data.draw(seeds, label="seed")
    ours = getattr(mth.snn, name)(C, **kwargs, **extras, dtype=layer_dtype, multi_time_step=mode == "m")
    ours.train(training)
    randomize_parameters(ours, seed)
    ref_d = twin_copy(ours, getattr(nn, name))
    ref_d.train(training)
    if device == "meta" and ref_d.momentum is None:
        ref_d.momentum = 0.1  # torch.nn reads num_batches_tracked with .item(), which meta tensors lack
    ref_d, ours = place(ref_d, device), place(ours, device)
    # input: the layer's rank (BatchNorm1d: with or without L) or a wrong one; right or wrong channels
    multi = data.draw(st.booleans(), label="multi-step input")
    if valid:  # B >= 2: two values per statistic, per step too
        lead = ([data.draw(st.integers(1, 3), label="T")] if multi else []) + [data.draw(st.integers(2, 3), label="B")]
    else:
        lead = leading_shape(data, multi)
    spatial_rank = data.draw(st.sampled_from([0, 1]), label="L?") if dims == 1 else dims
    if valid and dims == 1:  # a 3-D input is [T, B, C] in multi-step mode, [B, C, L] in single-step
        spatial_rank = (1 if mode == "s" else spatial_rank) if multi else (0 if mode == "m" else spatial_rank)
    spatial_rank += 0 if valid else data.draw(st.sampled_from([0] * 12 + [-1, 1]), label="rank change")
    spatial = [data.draw(st.integers(1, 4) if valid else st.integers(0, 4) if data.draw(st.integers(0, 9))
                         else st.integers(0, 1), label="spatial") for _ in range(max(spatial_rank, 0))]
    channels = C if valid else data.draw(st.sampled_from([C] * 9 + [C + 1]), label="input channels")
    shape = lead + [channels] + spatial
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    scale = data.draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3]), label="scale")
    offset = data.draw(st.sampled_from([0.0, 0.0, 3.0]), label="offset")
    x = make_tensor(shape, dtype, layout, input_device(device), seed, channel_dim=len(lead), scale=scale,
                    offset=offset)
    requires_grad = dtype in (torch.float32, torch.float64) and dtype == layer_dtype and device == "cpu"
    x.requires_grad_(requires_grad)

    rank = x.dim()
    if dims == 1:
        accepted = rank in (2, 3, 4)
        folds = rank == 4 or (rank == 3 and mode == "m")
    else:
        accepted = rank in (dims + 2, dims + 3)
        folds = rank == dims + 3
    batch_first = extras["batch_first"] and folds
    batch_stats = training or not kwargs["track_running_stats"]
    loop = extras["per_step"] and folds and batch_stats  # per-step statistics: one torch.nn call per t

    def time_major(t):
        return t.transpose(0, 1) if batch_first else t

    buffer_dtype = ours.running_var.dtype if ours.running_var is not None else None

    def step(m, t):
        """m(t); a float64 twin's running statistics then rounded to our buffers' dtype, as ours are
        after each update (a float16 variance may overflow to inf, and a later update of it be NaN)."""
        y = m(t)
        if m.running_var is not None and m.running_var.dtype != buffer_dtype:
            for key in ("running_mean", "running_var"):  # new tensors: the graph saved the old ones
                setattr(m, key, getattr(m, key).detach().to(buffer_dtype).to(torch.float64))
        return y

    def run_ref(m, t):
        if not folds:
            return m(t)
        steps = time_major(t)
        if loop:
            y = torch.stack([step(m, steps[i]) for i in range(steps.shape[0])]) if steps.shape[0] else steps * 1
        else:
            y = m(steps.flatten(0, 1)).unflatten(0, steps.shape[:2])
        return time_major(y)

    # torch.nn in float64 with the state before the call (ours updates its own state)
    ref64 = twin_copy(ours, getattr(nn, name)).double() if device == "cpu" else None
    state_before = {k: v.clone() for k, v in ours.state_dict().items()}

    def compare(y):
        ref64.train(training)
        x64 = x.detach().double().requires_grad_()
        y64 = run_ref(ref64, x64)
        u = u_of(dtype, layer_dtype)
        # statistics per (group, channel) on the time-major folded input [G, M, C, S]
        tm = (lambda t: time_major(t).flatten(0, 1)) if folds else (lambda t: t)
        xf = tm(x64.detach())
        groups = max(1, time_major(x64).shape[0]) if loop else 1  # no steps: an empty input
        xg, mean, var, count = bn_statistics(xf, groups)
        if not batch_stats:
            mean = state_before["running_mean"].double().reshape(1, 1, C, 1)
            var = state_before["running_var"].double().reshape(1, 1, C, 1)
        eps = kwargs["eps"]
        w = ours.weight.detach().double().abs().reshape(1, 1, C, 1) if ours.weight is not None else None
        b = ours.bias.detach().double().abs().reshape(1, 1, C, 1) if ours.bias is not None else None
        y64g = tm(y64.detach()).reshape(xg.shape)
        bound = normalization_bound(xg, mean, var, count, eps, w, b, y64g, u, conditioned=batch_stats)
        assert_close_bound(tm(y).reshape(xg.shape), y64g, bound, f"{name} output")
        if training and kwargs["track_running_stats"]:
            updates = groups
            for key in ("running_mean", "running_var"):
                # rounded to the buffer's dtype: a float16 variance may overflow to inf, as in torch.nn
                expected = getattr(ref64, key).to(getattr(ours, key).dtype).double()
                second = (mean * mean + var).amax() if xg.numel() else torch.tensor(0.0, dtype=torch.float64)
                sb = 4 * u * (count + 2) * updates * (expected.abs() + second + state_before[key].double().abs())
                assert_close_bound(getattr(ours, key), expected, sb, f"{name}.{key}")
            assert int(ours.num_batches_tracked) == int(ref64.num_batches_tracked), \
                f"num_batches_tracked {int(ours.num_batches_tracked)}, torch.nn {int(ref64.num_batches_tracked)}"
        if not requires_grad or y.numel() == 0:
            return
        dy = grad_output_like(y, seed)
        y.backward(dy)
        params = [p for p in (ref64.weight, ref64.bias) if p is not None]
        expected = torch.autograd.grad(y64, [x64] + params, dy.double())
        dyg = tm(dy.double()).reshape(xg.shape).abs()
        invstd = (var + eps).abs().rsqrt()
        xhat = ((xg - mean) * invstd).abs()
        wv = 1.0 if w is None else w
        cond = (1 + (mean * mean + var) / (var + eps).abs()) if batch_stats else 1.0
        k = (count + 1) if batch_stats else 1
        sums = (lambda t: t.sum(dim=(0, 1, 3))) if True else None
        dx_bound = 4 * u * k * cond * wv * invstd * (dyg + dyg.mean(dim=(1, 3), keepdim=True)
                                                    + xhat * (dyg * xhat).mean(dim=(1, 3), keepdim=True))
        assert_close_bound(tm(x.grad).reshape(xg.shape), tm(expected[0]).reshape(xg.shape), dx_bound,
                           f"{name} grad of input")
        grads = [g for g in (ours.weight, ours.bias) if g is not None]
        # x - mean rounds relative to |x| + |mean| (not to |x - mean|: eps may dwarf the variance)
        xhat_rounding = (xg.abs() + mean.abs()) * invstd
        bounds = [4 * u * (count * xg.shape[0] + 1) * sums(dyg * (cond * xhat + xhat_rounding)),
                  4 * u * (count * xg.shape[0] + 1) * sums(dyg)]
        for what, p, e, bd in zip(["weight", "bias"], grads, expected[1:], bounds):
            assert p.grad is not None, f"{name}: no gradient for the {what}"
            assert_close_bound(p.grad, e, bd.flatten(), f"{name} grad of {what}")

    reason = None if accepted else "a rank the layer does not take"
    if reason is None and x.shape[2 if folds else 1] != C:  # torch.nn without parameters would not notice
        reason = "channels unlike num_features"
    if reason is None and loop and time_major(x).shape[0] == 0 and kwargs["eps"] <= 0:
        reason = "eps <= 0 with batch statistics (refused even when no time step runs, docs/API.md)"
    check_layer(ours, ref_d, x, name=name, run_ref=run_ref, layer_dtype=layer_dtype, must_raise_reason=reason,
                device=device, norm=True, compare=compare, folded=(lambda t: list(time_major(t).flatten(0, 1).shape)) if folds else None)
    if device == "meta" and training and kwargs["track_running_stats"]:
        assert ours.running_mean.device.type == "meta"


# ---- LayerNorm ------------------------------------------------------------------------------------

@case
@given(data=st.data())
def test_layer_norm_layer(data):
    layer_norm_layer_case(data)


@case
@given(data=st.data())
def test_layer_norm_layer_valid(data):
    """test_layer_norm_layer on eps > 0 and non-empty CPU inputs ending in normalized_shape only
    (its draws are mostly errors or empty tensors)."""
    layer_norm_layer_case(data, valid=True)


def layer_norm_layer_case(data, valid=False):
    """valid: see test_layer_norm_layer_valid."""
    normalized = [data.draw(st.integers(1, 4) if valid or data.draw(st.integers(0, 9)) else st.integers(0, 1),
                            label="shape") for _ in range(data.draw(st.integers(1, 2), label="normalized rank"))]
    kwargs = dict(eps=data.draw(st.sampled_from([1e-5, 1e-3] if valid else [1e-5, 1e-5, 1e-3, 0.0, -1e-3]), label="eps"),
                  elementwise_affine=data.draw(st.booleans(), label="affine"),
                  bias=data.draw(st.booleans(), label="bias"))
    layer_dtype = data.draw(st.sampled_from(FLOATS), label="layer dtype")
    dtype = layer_dtype if valid else data.draw(st.sampled_from([layer_dtype] * 3 + FLOATS + NON_FLOATS),
                                                label="input dtype")
    device = "cpu" if valid else draw_device(data)
    seed = data.draw(seeds, label="seed")
    ours = mth.snn.LayerNorm(normalized, **kwargs, dtype=layer_dtype,
                             batch_first=data.draw(st.booleans(), label="batch_first"),
                             multi_time_step=data.draw(st.booleans(), label="multi_step"))
    randomize_parameters(ours, seed)
    ref_d = twin_copy(ours, nn.LayerNorm)
    ref_d, ours = place(ref_d, device), place(ours, device)
    smallest = 1 if valid else 0
    lead = [data.draw(st.integers(smallest, 3), label="leading")
            for _ in range(data.draw(st.integers(smallest, 3), label="lead rank"))]
    trailing = normalized if valid else \
        [s + data.draw(st.sampled_from([0] * 9 + [1]), label="size change") for s in normalized]
    x = make_tensor(lead + trailing, dtype, data.draw(st.sampled_from(LAYOUTS), label="layout"),
                    input_device(device), seed, scale=data.draw(st.sampled_from([1.0, 1e-3, 1e3]), label="scale"),
                    offset=data.draw(st.sampled_from([0.0, 3.0]), label="offset"))
    requires_grad = dtype in (torch.float32, torch.float64) and dtype == layer_dtype and device == "cpu"
    x.requires_grad_(requires_grad)
    D = math.prod(normalized)

    def compare(y):
        ref64 = twin_copy(ours, nn.LayerNorm).double()
        x64 = x.detach().double().requires_grad_()
        y64 = ref64(x64)
        u = u_of(dtype, layer_dtype)
        rows = x64.detach().reshape(x64.numel() // D if D else math.prod(x.shape[:x.dim() - len(normalized)]), D)
        mean = rows.mean(-1, keepdim=True)
        var = ((rows - mean) ** 2).mean(-1, keepdim=True)
        w = ours.weight.detach().double().abs().reshape(1, -1) if ours.weight is not None else None
        b = ours.bias.detach().double().abs().reshape(1, -1) if ours.bias is not None else None
        eps = kwargs["eps"]
        bound = normalization_bound(rows, mean, var, D, eps, w, b, y64.detach().reshape(rows.shape), u)
        assert_close_bound(y.reshape(rows.shape), y64.reshape(rows.shape), bound, "LayerNorm output")
        if not requires_grad or y.numel() == 0:
            return
        dy = grad_output_like(y, seed)
        y.backward(dy)
        params = [p for p in (ref64.weight, ref64.bias) if p is not None]
        expected = torch.autograd.grad(y64, [x64] + params, dy.double())
        dyr = dy.double().reshape(rows.shape).abs()
        invstd = (var + eps).abs().rsqrt()
        xhat = (rows - mean).abs() * invstd
        # the float64 reference's own error: its x - mean cancels, off by ~(D + 1) * eps64 * |x|
        xhat_ref_error = 64 * finfo_eps(torch.float64) * (D + 1) * rows.abs() * invstd
        wv = 1.0 if w is None else w
        cond = 1 + (mean * mean + var) / (var + eps).abs()
        dwyr = dyr * wv
        dx_bound = 4 * u * (D + 1) * cond * invstd * (dwyr + dwyr.mean(-1, keepdim=True)
                                                      + xhat * (dwyr * xhat).mean(-1, keepdim=True)) \
            + 2 * invstd * (dwyr * xhat_ref_error).mean(-1, keepdim=True) * (1 + xhat)
        assert_close_bound(x.grad.reshape(rows.shape), expected[0].reshape(rows.shape), dx_bound, "LayerNorm grad of input")
        n = rows.shape[0]
        bounds = [4 * u * (n + 1) * (D + 1) * (cond * dyr * xhat).sum(0) + (dyr * xhat_ref_error).sum(0),
                  4 * u * (n + 1) * dyr.sum(0)]
        grads = [g for g in (ours.weight, ours.bias) if g is not None]
        for what, p, e, bd in zip(["weight", "bias"], grads, expected[1:], bounds):
            assert p.grad is not None, f"LayerNorm: no gradient for the {what}"
            assert_close_bound(p.grad, e, bd.reshape(e.shape), f"LayerNorm grad of {what}")

    # the API: [T, B, ..., *shape] or [B, ..., *shape] (docs/API.md): one leading dimension at least
    reason = None if x.dim() > len(normalized) else "an input without a leading dimension"
    check_layer(ours, ref_d, x, name="LayerNorm", run_ref=lambda m, t: m(t), layer_dtype=layer_dtype,
                must_raise_reason=reason, device=device, norm=True, compare=compare)


# ---- the dense ops directly: linear, conv, conv_transpose -------------------------------------------

@case
@given(data=st.data())
def test_linear_op(data):
    """matterhorn.linear(input, weight, bias): any weight rank, bias shape, devices: torch's F.linear
    on the input is the verdict (except 0-D input and meta/cpu mixes: errors)."""
    linear_op_case(data)


@case
@given(data=st.data())
def test_linear_op_valid(data):
    """test_linear_op on valid, non-empty CPU arguments only: its draws are mostly errors."""
    linear_op_case(data, valid=True)


def linear_op_case(data, spike=False, valid=False):
    """spike: matterhorn.spike_linear on a 0/1 input, with gradients (check_spike_op).
    valid: no hostile choice is drawn (Hypothesis favours the small values that pick them)."""
    op_name = "spike_linear" if spike else "linear"
    v = valid_draws(spike) // 3  # spike: valid arguments 4x as often (the dense property draws the errors)
    seed = data.draw(seeds, label="seed")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    size = st.integers(1 if valid else 0, 4)
    in_f, out_f = data.draw(size, label="in"), data.draw(size, label="out")
    w_shape = [out_f, in_f] if valid else data.draw(
        st.sampled_from([[out_f, in_f]] * 6 * v + [[in_f], [out_f, in_f, 1], []]), label="weight shape")
    b_shape = data.draw(st.sampled_from([None, [out_f]] if valid else
                                        [None] + [[out_f]] * 2 * v + [[out_f + 1], [1, out_f], []]), label="bias shape")
    x_shape = [data.draw(st.integers(1 if valid else 0, 3)) for _ in range(data.draw(st.integers(1 if valid else 0, 3)))]
    x_shape += [in_f if valid else data.draw(st.sampled_from([in_f, in_f] * v + [in_f + 1]))]
    devices = ["cpu"] * 3 if valid else \
        [data.draw(st.sampled_from(["cpu"] * 6 * v + ["meta"]), label=f"device {k}") for k in range(3)]
    layouts = [data.draw(st.sampled_from(LAYOUTS), label=f"layout {k}") for k in range(2)]
    x = make_tensor(x_shape, dtype, layouts[0], devices[0], seed)
    w = make_tensor(w_shape, dtype, layouts[1], devices[1], seed + 1)
    b = None if b_shape is None else make_tensor(b_shape, dtype, "contiguous", devices[2], seed + 2)
    not_spikes, graph = draw_spike_op_input(data, [x, w, b]) if spike else (False, False)
    record(f"torch.ops.matterhorn.{op_name}({describe(x)}, {describe(w)}, {describe(b)})")
    result = outcome(lambda: getattr(ops, op_name)(x, w, b))
    mixed = len({t.device.type for t in (x, w, b) if t is not None}) > 1
    expected = outcome(lambda: F.linear(x, w, b))
    # the op's contract: weight [O, I], bias [O] (F.linear would also broadcast a bias)
    if mixed or isinstance(expected, Raised) or w.dim() != 2 or (b is not None and list(b.shape) != [w.shape[0]]):
        check_clean_error(result, "Linear")
        return
    if not_spikes and graph:
        check_not_spikes(result, "Linear")
        return
    assert not isinstance(result, Raised), f"F.linear returns {describe(expected)}, matterhorn.{op_name} {result!r}"
    assert result.shape == expected.shape and result.dtype == expected.dtype
    if x.device.type == "cpu":
        args = [x.detach().double(), w.detach().double(), None if b is None else b.detach().double()]
        bound, _ = bilinear_bounds(F.linear, args, None, u_of(dtype))
        assert_close_bound(result, F.linear(*args), bound, f"matterhorn.{op_name}")
        if spike:
            check_spike_op(result, ops.linear, F.linear, [x, w, b], seed, op_name)


@case
@given(data=st.data())
def test_conv_ops(data):
    """matterhorn.conv / conv_transpose with hostile arguments: list lengths, negative or zero
    values, groups that do not divide, padding modes, output_size. The verdict on valid arguments
    is torch's functional convolution of the folded input (explicit padding for pairs and modes);
    arguments torch refuses (or that the op's schema forbids) must be clean errors."""
    conv_op_case(data)


@case
@given(data=st.data())
def test_conv_ops_valid(data):
    """test_conv_ops with valid arguments drawn far more often, so that the bounded CI run compares
    values for conv and conv_transpose in 1d, 2d and 3d (test_conv_ops' draws are mostly errors):
    only valid arguments, spatial sizes that fit the kernel, and CPU inputs with a batch. Each
    example runs all six ops, so that none depends on what the derandomized draws pick."""
    for transposed in (False, True):
        for dims in (1, 2, 3):
            conv_op_case(data, valid=True, kind=(transposed, dims))


def conv_op_case(data, spike=False, valid=False, kind=None):
    """spike: matterhorn.spike_conv / spike_conv_transpose on a 0/1 input, with gradients (check_spike_op).
    valid: no hostile choice is drawn (Hypothesis favours the small values that pick them).
    kind: (transposed, dims) given instead of drawn."""
    seed = data.draw(seeds, label="seed")
    transposed = data.draw(st.booleans(), label="transposed") if kind is None else kind[0]
    op_name = ("spike_" if spike else "") + ("conv_transpose" if transposed else "conv")
    v = valid_draws(spike) // 3  # spike: valid arguments 4x as often (the dense property draws the errors)

    def hostile(n):  # one draw in n a hostile choice
        return not valid and data.draw(st.integers(0, n - 1)) == 0

    dims = data.draw(st.integers(1, 3), label="dims") if kind is None else kind[1]
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    groups = data.draw(st.sampled_from([1, 2, 3] if valid else [1, 1, 2, 3] * v + [0, -1]), label="groups")
    g = max(groups, 1)
    cin, cout = data.draw(st.integers(1, 3)) * g, data.draw(st.integers(1, 3)) * g
    if hostile(6 * v):
        cin += 1
    k = [data.draw(st.integers(1, 3)) for _ in range(dims)]
    w_shape = [cin, cout // g] + k if transposed else [cout, cin // g] + k
    if hostile(10 * v):
        w_shape = w_shape[:-1] if data.draw(st.booleans()) else w_shape + [1]
    lengths = lambda: dims if valid else data.draw(st.sampled_from([dims] * 8 * v + [dims - 1, dims + 1]))  # noqa: E731
    values = lambda lo, n: [data.draw(st.integers(lo, 2)) for _ in range(n)]  # noqa: E731
    stride = values(-1 if hostile(10 * v) else 1, lengths())
    dilation = values(-1 if hostile(10 * v) else 1, lengths())
    n_pad = lengths() if transposed else data.draw(
        st.sampled_from([dims, 2 * dims] if valid else [dims, dims] * v + [2 * dims, dims + 1]))
    padding = values(-1 if hostile(10 * v) else 0, n_pad)
    b_shape = data.draw(st.sampled_from([None, [cout]] if valid else [None] + [[cout]] * 2 * v + [[cout + 1]]),
                        label="bias")
    multi = data.draw(st.booleans(), label="multi")
    if valid:  # the kernel fits the input, however padded (reflect needs padding < size)
        spatial = [data.draw(st.integers(0, 3)) + dilation[d] * (k[d] - 1) + 1 + 2 * max(padding) for d in range(dims)]
    else:
        spatial = [data.draw(st.integers(0, 5)) for _ in range(dims)]
    lead = [data.draw(st.integers(1 if valid else 0, 3)) for _ in range(2 if multi else 1)]
    x = make_tensor(lead + [cin] + spatial, dtype, data.draw(st.sampled_from(LAYOUTS)),
                    "cpu" if valid else data.draw(st.sampled_from(["cpu"] * 9 * v + ["meta"]), label="input device"),
                    seed, channel_dim=len(lead))
    w = make_tensor(w_shape, dtype, "contiguous", "cpu", seed + 1)
    b = None if b_shape is None else make_tensor(b_shape, dtype, "contiguous", "cpu", seed + 2)
    not_spikes, graph = draw_spike_op_input(data, [x, w, b]) if spike else (False, False)
    folded = x.flatten(0, 1) if multi else x
    fn = [None, F.conv1d, F.conv2d, F.conv3d][dims] if not transposed else \
        [None, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][dims]
    if transposed:
        if valid:  # torch.nn's rule: smaller than stride or dilation
            output_padding = [data.draw(st.integers(0, max(stride[d], dilation[d]) - 1)) for d in range(dims)]
        else:
            output_padding = values(0, lengths())
        output_size = None
        if data.draw(st.integers(0, 3)) == 0:
            if valid:  # sizes in output_padding's range [0, stride)
                output_size = [(spatial[d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k[d] - 1) + 1
                               + data.draw(st.integers(0, stride[d] - 1)) for d in range(dims)]
            else:
                output_size = [data.draw(st.integers(0, 12))
                               for _ in range(data.draw(st.sampled_from([dims, dims] * v + [dims + 1])))]
        record(f"torch.ops.matterhorn.{op_name}({describe(x)}, {describe(w)}, {describe(b)}, stride={stride}, "
               f"padding={padding}, output_padding={output_padding}, groups={groups}, dilation={dilation}, "
               f"output_size={output_size})")

        def dense(xx, ww, bb, op=ops.conv_transpose):
            return op(xx, ww, bb, stride, padding, output_padding, groups, dilation, output_size)

        def reference(xx, ww, bb):
            op = output_padding
            if output_size is not None:  # torch.nn's rule: output_size picks output_padding in [0, stride)
                smallest = [(xx.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (ww.shape[2 + d] - 1) + 1
                            for d in range(dims)]
                op = [s - m for s, m in zip(output_size, smallest)]
                assert all(0 <= o < stride[d] for d, o in enumerate(op)), "output_size out of range"
            return fn(xx, ww, bb, stride, padding, op, groups, dilation)
        invalid = (len(stride) != dims or len(dilation) != dims or len(padding) != dims or len(output_padding) != dims
                   or (output_size is not None and len(output_size) != dims))
        # ours: an output size over zero is required (docs: "the output would be empty")
    else:
        modes = ["zeros", "zeros", "reflect", "replicate", "circular"]
        mode = data.draw(st.sampled_from(modes if valid else modes * v + ["bogus"]))
        record(f"torch.ops.matterhorn.{op_name}({describe(x)}, {describe(w)}, {describe(b)}, stride={stride}, "
               f"padding={padding}, dilation={dilation}, groups={groups}, padding_mode={mode!r})")

        def dense(xx, ww, bb, op=ops.conv):
            return op(xx, ww, bb, stride, padding, dilation, groups, mode)

        def reference(xx, ww, bb):
            pairs = padding if len(padding) == 2 * dims else [p for p in padding for _ in (0, 1)]
            assert len(pairs) == 2 * dims and all(p >= 0 for p in pairs)
            flat = [v for d in reversed(range(dims)) for v in pairs[2 * d:2 * d + 2]]
            padded = F.pad(xx, flat, mode="constant" if mode == "zeros" else mode)
            return fn(padded, ww, bb, stride, 0, dilation, groups)
        invalid = mode == "bogus" or len(stride) != dims or len(dilation) != dims
    result = outcome(lambda: dense(x, w, b, getattr(ops, op_name)))
    # the op's contract, also where torch lets an empty input through
    invalid = invalid or min(stride + dilation) < 1 or min(padding, default=0) < 0 or groups < 1 or (
        transposed and min(output_padding, default=0) < 0) or (  # torch.nn's rule, checked on empty inputs too
        transposed and len(output_padding) == len(stride) == len(dilation) and
        any(o >= s and o >= d for o, s, d in zip(output_padding, stride, dilation)))
    # a spatial size of 0 beside a batch and channels: torch.nn's convolutions refuse it (however padded)
    invalid = invalid or (folded.dim() == dims + 2 and 0 in folded.shape[2:] and min(folded.shape[:2]) > 0)
    if transposed and not invalid and w.dim() == dims + 2 and output_size is None:  # "the output would be empty"
        invalid = any((folded.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (w.shape[2 + d] - 1) + 1
                      + output_padding[d] <= 0 for d in range(dims))
    expected = outcome(lambda: reference(folded, w, b)) if not invalid else None
    if invalid or isinstance(expected, Raised) or x.device.type == "meta":
        check_clean_error(result, "Conv")
        return
    if not_spikes and graph:
        check_not_spikes(result, f"{'ConvTranspose' if transposed else 'Conv'}{dims}d")
        return
    assert not isinstance(result, Raised), f"torch's convolution returns {describe(expected)}, ours {result!r}"
    expected = expected.unflatten(0, x.shape[:2]) if multi else expected
    assert result.shape == expected.shape and result.dtype == expected.dtype
    args = [folded.detach().double(), w.detach().double(), None if b is None else b.detach().double()]
    bound, _ = bilinear_bounds(reference, args, None, u_of(dtype))
    unfold = (lambda t: t.unflatten(0, x.shape[:2])) if multi else (lambda t: t)
    assert_close_bound(result, unfold(reference(*args)), unfold(bound), f"matterhorn.{op_name}")
    if spike:  # a padding mode's input gradient sums its wrapped terms in another order (docs/API.md)
        check_spike_op(result, dense, lambda xx, ww, bb: unfold(reference(xx.flatten(0, 1) if multi else xx, ww, bb)),
                       [x, w, b], seed, op_name, input_grad_exact=transposed or mode == "zeros" or not any(padding))


# ---- BatchNorm building blocks ------------------------------------------------------------------

def stats_shape_variants(data, G, C, label, valid=False):
    """[G, C] mostly; sometimes transposed (same numel), one short or one long (valid: [G, C])."""
    if valid:
        return [G, C]
    return data.draw(st.sampled_from([[G, C]] * 8 + [[C, G], [G, C + 1], [G, max(C - 1, 0)]]), label=label)


def bn_reference(x64, G):
    xg = group_view(x64, G)
    mean = xg.mean(dim=(1, 3))
    var = ((xg - mean[:, None, :, None]) ** 2).mean(dim=(1, 3))
    return xg, mean, var


def draw_block_input(data, seed, valid=False):
    """A folded [N, C, *S] input with N = G * M (or a groups value that does not divide N).
    valid: a floating, non-empty input that groups divides."""
    dtype = data.draw(st.sampled_from(FLOATS + ([] if valid else [torch.int64])), label="dtype")
    G = data.draw(st.sampled_from([1, 1, 2, 3]), label="groups")
    low = 1 if valid else 0
    M, C = data.draw(st.integers(low, 3), label="M"), data.draw(st.integers(low, 4), label="C")
    S = [data.draw(st.integers(low, 4)) for _ in range(data.draw(st.integers(0, 3), label="spatial rank"))]
    N = G * M + (1 if not valid and data.draw(st.integers(0, 9)) == 0 else 0)
    groups = G if valid else data.draw(st.sampled_from([G] * 8 + [0, -1]), label="groups argument")
    if not valid and data.draw(st.integers(0, 19)) == 0:
        shape = [N]  # rank 1
    else:
        shape = [N, C] + S
    x = make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS), label="layout"), "cpu", seed, channel_dim=1,
                    offset=data.draw(st.sampled_from([0.0, 3.0])))
    return x, G, C, groups, dtype


def block_input_valid(x, G, groups):
    return x.dim() >= 2 and groups >= 1 and x.shape[0] % groups == 0 and x.dtype.is_floating_point


def maybe_meta(data, t, label, valid=False):
    """A tensor moved to meta one draw in twelve (beside cpu tensors: must be an error)."""
    if t is not None and not valid and data.draw(st.integers(0, 11), label=f"{label} on meta") == 0:
        return t.to("meta")
    return t


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_block(result, valid, tensors, op, compare, either=False):
    """valid: must equal the reference (compare); invalid or meta mixed with cpu: a clean error;
    either: an argument without effect on the result (an empty input): one or the other."""
    mixed = len({t.device.type for t in tensors if t is not None}) > 1
    if either and not mixed and isinstance(result, Raised):
        valid = False
    if not valid or mixed:
        family = ("BatchNorm", "batch_norm") if op.startswith("batch_norm") else ("LayerNorm", "layer_norm")
        check_clean_error(result, (op, *family))
        return
    assert not isinstance(result, Raised), f"{op} on valid arguments {result!r}"
    compare(result)


@case
@given(data=st.data())
def test_batch_norm_stats_op(data):
    seed = data.draw(seeds)
    x, G, C, groups, dtype = draw_block_input(data, seed)
    x = maybe_meta(data, x, "input")
    record(f"torch.ops.matterhorn.batch_norm_stats({describe(x)}, {groups})")
    result = outcome(lambda: ops.batch_norm_stats(x, groups))
    valid = block_input_valid(x, G, groups)
    if valid and x.device.type == "meta":
        assert not isinstance(result, Raised), f"meta: {result!r}"
        assert [list(t.shape) for t in result] == [[groups, x.shape[1]]] * 2
        return
    empty = valid and x.numel() == 0 and x.shape[1] > 0

    def compare(r):
        mean, var = r
        xg, m64, v64 = bn_reference(x.double(), groups)
        count = xg.shape[1] * xg.shape[3]
        assert mean.dtype == var.dtype == acc_dtype(dtype)
        u = u_of(dtype, acc_dtype(dtype))
        second = m64 * m64 + v64
        assert_close_bound(mean, m64, 4 * u * (count + 1) * second.sqrt(), "batch_norm_stats mean")
        assert_close_bound(var, v64, 4 * u * (count + 1) * second, "batch_norm_stats var")

    if empty and isinstance(result, Raised):  # no values per channel: an error, or NaN statistics
        check_clean_error(result, "batch_norm_stats")
        return
    check_block(result, valid, [x], "batch_norm_stats", compare)


def elemt_reference(x64, mean, var, w, b, eps, G):
    xg = group_view(x64, G)
    scale = (var + eps).rsqrt()
    y = (xg - mean[:, None, :, None]) * scale[:, None, :, None]
    if w is not None:
        y = y * w[None, None, :, None]
    if b is not None:
        y = y + b[None, None, :, None]
    return y.reshape(x64.shape)


def draw_stats(data, G, C, dtype, seed, label, positive=False, valid=False):
    shape = stats_shape_variants(data, G, C, label, valid)
    t = make_tensor(shape, acc_dtype(dtype) if dtype.is_floating_point else torch.float32, "contiguous", "cpu", seed)
    return t.abs() + 0.1 if positive else t


def draw_param(data, C, dtype, seed, label, valid=False):
    choice = data.draw(st.sampled_from(["ok", "none"] if valid else ["none", "ok", "ok", "ok", "long", "short"]),
                       label=label)
    if choice == "none":
        return None
    size = C + (1 if choice == "long" else -1 if choice == "short" and C > 0 else 0)
    pdt = dtype if dtype.is_floating_point else torch.float32
    return make_tensor([size], pdt, "contiguous", "cpu", seed)


@case
@given(data=st.data())
def test_batch_norm_elemt_op(data):
    batch_norm_elemt_case(data)


@case
@given(data=st.data())
def test_batch_norm_elemt_op_valid(data):
    """test_batch_norm_elemt_op on valid, non-empty arguments only: its draws are mostly errors."""
    batch_norm_elemt_case(data, valid=True)


def batch_norm_elemt_case(data, valid=False):
    seed = data.draw(seeds)
    x, G, C, groups, dtype = draw_block_input(data, seed, valid)
    mean = draw_stats(data, G, C, dtype, seed + 1, "mean shape", valid=valid)
    var = draw_stats(data, G, C, dtype, seed + 2, "var shape", positive=True, valid=valid)
    w, b = draw_param(data, C, dtype, seed + 3, "weight", valid), draw_param(data, C, dtype, seed + 4, "bias", valid)
    eps = data.draw(st.sampled_from([1e-5, 0.0, 0.5] if valid else [1e-5, 1e-5, 0.0, 0.5, -1e-3, -10.0]), label="eps")
    x, mean, var, w = (maybe_meta(data, t, l, valid) for t, l in [(x, "x"), (mean, "mean"), (var, "var"), (w, "w")])
    record(f"torch.ops.matterhorn.batch_norm_elemt({describe(x)}, {describe(mean)}, {describe(var)}, {describe(w)}, "
           f"{describe(b)}, eps={eps}, groups={groups})")
    result = outcome(lambda: ops.batch_norm_elemt(x, mean, var, w, b, eps, groups))
    valid = (block_input_valid(x, G, groups) and list(mean.shape) == [groups, x.shape[1]]
             and list(var.shape) == [groups, x.shape[1]] and eps >= 0
             and all(p is None or list(p.shape) == [x.shape[1]] for p in (w, b)))

    def compare(y):
        assert y.shape == x.shape and y.dtype == x.dtype
        if y.device.type == "meta":
            return
        ps = [None if p is None else p.double() for p in (w, b)]
        y64 = elemt_reference(x.double(), mean.double(), var.double(), *ps, eps, groups)
        u = u_of(dtype, mean.dtype, *[p.dtype for p in (w, b) if p is not None])
        xg = group_view(x.double(), groups)
        bound = normalization_bound(xg, mean.double()[:, None, :, None], var.double()[:, None, :, None], 1, eps,
                                    None if ps[0] is None else ps[0].abs()[None, None, :, None],
                                    None if ps[1] is None else ps[1].abs()[None, None, :, None],
                                    y64.reshape(xg.shape), u, conditioned=False)
        assert_close_bound(y, y64, bound.reshape(x.shape), "batch_norm_elemt")

    check_block(result, valid, [x, mean, var, w, b], "batch_norm_elemt", compare)


def draw_grad_output(data, x, seed):
    """dy like x; or another shape (same numel, fewer or more elements), dtype or device."""
    choice = data.draw(st.sampled_from(["same"] * 8 + ["reshaped", "short", "long", "dtype"]), label="grad_output")
    shape, dtype = list(x.shape), x.dtype if x.dtype.is_floating_point else torch.float32
    if choice == "reshaped" and x.dim() >= 2:
        shape = [shape[1], shape[0]] + shape[2:]
    elif choice == "short":
        shape = [max(shape[0] - 1, 0)] + shape[1:]
    elif choice == "long":
        shape = [shape[0] + 1] + shape[1:] if x.dim() else [2]
    elif choice == "dtype":
        dtype = torch.float64 if dtype != torch.float64 else torch.float32
    return make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS), label="dy layout"), "cpu", seed)


@case
@given(data=st.data())
def test_batch_norm_backward_reduce_op(data):
    seed = data.draw(seeds)
    x, G, C, groups, dtype = draw_block_input(data, seed)
    dy = draw_grad_output(data, x, seed + 1)
    mean = draw_stats(data, G, C, dtype, seed + 2, "mean shape")
    dy, x, mean = (maybe_meta(data, t, l) for t, l in [(dy, "dy"), (x, "x"), (mean, "mean")])
    record(f"torch.ops.matterhorn.batch_norm_backward_reduce({describe(dy)}, {describe(x)}, {describe(mean)}, {groups})")
    result = outcome(lambda: ops.batch_norm_backward_reduce(dy, x, mean, groups))
    valid = (block_input_valid(x, G, groups) and dy.shape == x.shape and dy.dtype == x.dtype
             and list(mean.shape) == [groups, x.shape[1]])

    def compare(r):
        sum_dy, sum_dy_xmu = r
        assert list(sum_dy.shape) == list(sum_dy_xmu.shape) == [groups, x.shape[1]]
        if sum_dy.device.type == "meta":
            return
        xg = group_view(x.double(), groups)
        dyg = dy.double().reshape(xg.shape)
        xmu = xg - mean.double()[:, None, :, None]
        count = xg.shape[1] * xg.shape[3]
        u = u_of(dtype, mean.dtype)
        assert_close_bound(sum_dy, dyg.sum(dim=(1, 3)), 4 * u * (count + 1) * dyg.abs().sum(dim=(1, 3)), "sum_dy")
        assert_close_bound(sum_dy_xmu, (dyg * xmu).sum(dim=(1, 3)),
                           4 * u * (count + 1) * (dyg.abs() * (xg.abs() + mean.double().abs()[:, None, :, None])).sum(dim=(1, 3)),
                           "sum_dy_xmu")

    check_block(result, valid, [dy, x, mean], "batch_norm_backward_reduce", compare)


@case
@given(data=st.data())
def test_batch_norm_backward_elemt_op(data):
    seed = data.draw(seeds)
    x, G, C, groups, dtype = draw_block_input(data, seed)
    dy = draw_grad_output(data, x, seed + 1)
    mean = draw_stats(data, G, C, dtype, seed + 2, "mean shape")
    var = draw_stats(data, G, C, dtype, seed + 3, "var shape", positive=True)
    w = draw_param(data, C, dtype, seed + 4, "weight")
    sum_dy = draw_stats(data, G, C, dtype, seed + 5, "sum_dy shape")
    sum_dy_xmu = draw_stats(data, G, C, dtype, seed + 6, "sum_dy_xmu shape")
    eps = data.draw(st.sampled_from([1e-5, 1e-5, 0.5, -1e-3]), label="eps")
    per_group = (x.numel() // max(1, x.shape[0] * x.shape[1]) * (x.shape[0] // groups)) if x.dim() >= 2 and groups >= 1 else 0
    count = data.draw(st.sampled_from([per_group] * 4 + [per_group * 3, 0, -1, 1]), label="count")
    dy, x, mean, var, sum_dy = (maybe_meta(data, t, l) for t, l in
                                [(dy, "dy"), (x, "x"), (mean, "mean"), (var, "var"), (sum_dy, "sum_dy")])
    record(f"torch.ops.matterhorn.batch_norm_backward_elemt({describe(dy)}, {describe(x)}, {describe(mean)}, "
           f"{describe(var)}, {describe(w)}, {describe(sum_dy)}, {describe(sum_dy_xmu)}, eps={eps}, count={count}, "
           f"groups={groups})")
    result = outcome(lambda: ops.batch_norm_backward_elemt(dy, x, mean, var, w, sum_dy, sum_dy_xmu, eps, count, groups))
    stats_ok = all(list(t.shape) == [groups, x.shape[1]] for t in (mean, var, sum_dy, sum_dy_xmu)) if x.dim() >= 2 else False
    valid = (block_input_valid(x, G, groups) and dy.shape == x.shape and dy.dtype == x.dtype and stats_ok
             and (w is None or list(w.shape) == [x.shape[1]]) and eps >= 0)
    either = False
    if valid and count < 1:  # no value to average over: an error, unless there is no value at all
        valid, either = x.numel() == 0, x.numel() == 0
    if valid and count < per_group:  # count covers every process: at least this one's values (docs/API.md)
        valid = False

    def compare(dx):
        assert dx.shape == x.shape and dx.dtype == x.dtype
        if dx.device.type == "meta":
            return
        xg = group_view(x.double(), groups)
        dyg = dy.double().reshape(xg.shape)
        e = lambda t: t.double()[:, None, :, None]  # noqa: E731
        invstd = (e(var) + eps).rsqrt()
        wv = 1.0 if w is None else w.double()[None, None, :, None]
        expected = (dyg - e(sum_dy) / count - (xg - e(mean)) * invstd ** 2 * e(sum_dy_xmu) / count) * invstd * wv
        u = u_of(dtype, mean.dtype)
        bound = 8 * u * (dyg.abs() + e(sum_dy).abs() / count
                         + (xg.abs() + e(mean).abs()) * invstd ** 2 * e(sum_dy_xmu).abs() / count) * invstd * abs(wv)
        assert_close_bound(dx, expected.reshape(x.shape), bound.reshape(x.shape), "batch_norm_backward_elemt")

    check_block(result, valid, [dy, x, mean, var, w, sum_dy, sum_dy_xmu], "batch_norm_backward_elemt", compare,
                either=either)


@case
@given(data=st.data())
def test_batch_norm_update_stats_op(data):
    seed = data.draw(seeds)
    C = data.draw(st.integers(0, 4), label="C")
    G = data.draw(st.integers(1, 3), label="G")
    dtype = data.draw(st.sampled_from(FLOATS), label="running dtype")
    stat_dtype = data.draw(st.sampled_from([acc_dtype(dtype), torch.float32, torch.float64]), label="stat dtype")
    mean = make_tensor(stats_shape_variants(data, G, C, "mean shape"), stat_dtype, "contiguous", "cpu", seed)
    var = make_tensor(stats_shape_variants(data, G, C, "var shape"), stat_dtype, "contiguous", "cpu", seed + 1).abs()
    rm = make_tensor([C + data.draw(st.sampled_from([0] * 9 + [1]))], dtype, "contiguous", "cpu", seed + 2)
    rv = make_tensor([C + data.draw(st.sampled_from([0] * 9 + [1]))], dtype, "contiguous", "cpu", seed + 3).abs()
    nbt_kind = data.draw(st.sampled_from(["scalar"] * 5 + ["none", "[2]", "[0]", "float"]), label="num_batches_tracked")
    nbt = {"scalar": torch.tensor(data.draw(st.integers(0, 5))), "none": None, "[2]": torch.zeros(2, dtype=torch.long),
           "[0]": torch.zeros(0, dtype=torch.long), "float": torch.tensor(1.0)}[nbt_kind]
    momentum = data.draw(st.sampled_from([0.1, 0.1, None, 0.0, 1.0]), label="momentum")
    count = data.draw(st.sampled_from([2, 10, 1000, 1, 0, -3]), label="count")
    rm, rv, mean, nbt = (maybe_meta(data, t, l) for t, l in [(rm, "rm"), (rv, "rv"), (mean, "mean"), (nbt, "nbt")])
    before = [None if t is None or t.device.type == "meta" else t.clone() for t in (rm, rv, nbt)]
    record(f"torch.ops.matterhorn.batch_norm_update_stats({describe(mean)}, {describe(var)}, {count}, {describe(rm)}, "
           f"{describe(rv)}, {describe(nbt)}, momentum={momentum})")
    result = outcome(lambda: ops.batch_norm_update_stats(mean, var, count, rm, rv, nbt, momentum))
    # consistent shapes, whatever variants were drawn: [G, C] statistics (G >= 1), [C] running ones
    valid = (mean.dim() == 2 and mean.shape[0] >= 1 and list(var.shape) == list(mean.shape)
             and list(rm.shape) == list(rv.shape) == [mean.shape[1]] and nbt_kind in ("scalar", "none"))
    if valid:
        G, C = mean.shape
    # count 0 is torch.nn's empty training batch (statistics kept, num_batches_tracked counted); 1 or
    # fewer has no unbiased variance: an error (with C = 0 there is nothing to update: may pass)
    if valid and count != 0 and count < 2 and (C > 0 or isinstance(result, Raised)):
        valid = False
    if valid and momentum is None and nbt is None and isinstance(result, Raised):
        check_clean_error(result, ("batch_norm_update_stats", "BatchNorm"))  # no count to average over: may refuse
        return

    def compare(_):
        if rm.device.type == "meta":
            return
        erm, erv = before[0].double(), before[1].double()
        batches = int(before[2]) if before[2] is not None else None
        for g in range(G):
            factor = 0.0 if momentum is None else momentum  # no count: nothing changes
            if batches is not None:
                batches += 1
                factor = 1.0 / batches if momentum is None else momentum
            if count > 0:
                erm = (1 - factor) * erm + factor * mean[g].double()
                erv = (1 - factor) * erv + factor * var[g].double() * count / (count - 1)
        u = u_of(dtype, stat_dtype)
        scale = 4 * u * (G + 2) * (erm.abs() + erv.abs() + mean.double().abs().amax(0) + var.double().amax(0) * 2)
        assert_close_bound(rm, erm, scale, "running_mean")
        assert_close_bound(rv, erv, scale, "running_var")
        if nbt is not None:
            assert int(nbt) == batches, f"num_batches_tracked {int(nbt)}, expected {batches}"

    check_block(result, valid, [mean, var, rm, rv, nbt], "batch_norm_update_stats", compare)


@case
@given(data=st.data())
def test_batch_norm_normalize_op(data):
    batch_norm_normalize_case(data)


@case
@given(data=st.data())
def test_batch_norm_normalize_op_valid(data):
    """test_batch_norm_normalize_op on valid, non-empty arguments only: its draws are mostly errors."""
    batch_norm_normalize_case(data, valid=True)


def batch_norm_normalize_case(data, valid=False):
    seed = data.draw(seeds)
    x, G, C, groups, dtype = draw_block_input(data, seed, valid)
    w, b = draw_param(data, C, dtype, seed + 1, "weight", valid), draw_param(data, C, dtype, seed + 2, "bias", valid)
    batch_statistics = data.draw(st.booleans(), label="batch_statistics")
    running = [draw_param(data, C, dtype, seed + 3 + k, f"running {k}", valid) for k in range(2)]
    running[1] = None if running[1] is None else running[1].abs() + 0.1
    if valid and None in running:  # running statistics are needed without batch statistics
        batch_statistics = True
    eps = data.draw(st.sampled_from([1e-5, 0.5, 0.0] if valid else [1e-5, 1e-5, 0.5, 0.0, -1e-3]), label="eps")
    x = maybe_meta(data, x, "x", valid)
    record(f"torch.ops.matterhorn.batch_norm_normalize({describe(x)}, {describe(w)}, {describe(b)}, "
           f"{describe(running[0])}, {describe(running[1])}, {batch_statistics}, {eps}, {groups})")
    result = outcome(lambda: ops.batch_norm_normalize(x, w, b, running[0], running[1], batch_statistics, eps, groups))
    Cx = x.shape[1] if x.dim() >= 2 else -1
    valid = (block_input_valid(x, G, groups) and eps >= 0
             and all(p is None or list(p.shape) == [Cx] for p in (w, b, *([] if batch_statistics else running)))
             and (batch_statistics or all(r is not None for r in running)))
    if valid and batch_statistics and x.numel() == 0 and Cx > 0 and isinstance(result, Raised):
        check_clean_error(result, "batch_norm")  # no values to take statistics of: an error, or NaN
        return

    def compare(r):
        y, mean, var = r
        assert y.shape == x.shape and y.dtype == x.dtype
        if y.device.type == "meta":
            return
        x64 = x.double()
        if batch_statistics:
            xg, m64, v64 = bn_reference(x64, groups)
            count = xg.shape[1] * xg.shape[3]
            second = m64 * m64 + v64
            u = u_of(dtype, acc_dtype(dtype))
            assert_close_bound(mean, m64, 4 * u * (count + 1) * second.sqrt(), "batch_norm_normalize mean")
            assert_close_bound(var, v64, 4 * u * (count + 1) * second, "batch_norm_normalize var")
        else:
            m64, v64, count = running[0].double()[None], running[1].double()[None], 1
            assert mean.numel() == 0 and var.numel() == 0
        ps = [None if p is None else p.double() for p in (w, b)]
        G_ = m64.shape[0]
        y64 = elemt_reference(x64, m64, v64, *ps, eps, G_) if G_ == groups or not batch_statistics else None
        if not batch_statistics:
            y64 = elemt_reference(x64, m64.expand(groups, -1), v64.expand(groups, -1), *ps, eps, groups)
        xg = group_view(x64, groups)
        mg = m64.expand(groups, -1)[:, None, :, None]
        vg = v64.expand(groups, -1)[:, None, :, None]
        bound = normalization_bound(xg, mg, vg, count, eps,
                                    None if ps[0] is None else ps[0].abs()[None, None, :, None],
                                    None if ps[1] is None else ps[1].abs()[None, None, :, None],
                                    y64.reshape(xg.shape), u_of(dtype, *[p.dtype for p in (w, b) if p is not None]),
                                    conditioned=batch_statistics)
        assert_close_bound(y, y64, bound.reshape(x.shape), "batch_norm_normalize output")

    used = [x, w, b] + ([] if batch_statistics else running)  # batch statistics never read the running ones
    check_block(result, valid, used, "batch_norm_normalize", compare)


@case
@given(data=st.data())
def test_batch_norm_op(data):
    """The layer op directly, with argument combinations the classes never pass: one running
    statistic without the other, num_batches_tracked of another size or dtype, a layer name of no 1d/2d/3d,
    num_features unlike the parameters, negative eps. torch's F.batch_norm on the folded input
    is the verdict; what it refuses must be a clean error."""
    seed = data.draw(seeds)
    dims = data.draw(st.sampled_from([1, 2, 3, 2, 0, 4]), label="dims")
    C = data.draw(st.integers(1, 3), label="C")
    num_features = data.draw(st.sampled_from([C] * 6 + [C + 1, 0]), label="num_features")
    d = min(max(dims, 1), 3)
    T, B = data.draw(st.integers(0, 3), label="T"), data.draw(st.integers(0, 3), label="B")
    spatial = [data.draw(st.integers(0, 3)) for _ in range(d)]
    x = make_tensor([T, B, C] + spatial, torch.float64, data.draw(st.sampled_from(LAYOUTS)), "cpu", seed, channel_dim=2)
    param = lambda s, size: make_tensor([size], torch.float64, "contiguous", "cpu", seed + s)  # noqa: E731
    w = data.draw(st.sampled_from([param(1, C), param(1, C), None, param(1, C + 1)]), label="weight")
    b = data.draw(st.sampled_from([param(2, C), None]), label="bias")
    rm = data.draw(st.sampled_from([param(3, C), param(3, C), None, param(3, C + 1)]), label="running_mean")
    rv = data.draw(st.sampled_from([param(4, C).abs() + 0.1] * 2 + [None]), label="running_var")
    nbt = data.draw(st.sampled_from([torch.tensor(2), torch.tensor(2), None, torch.zeros(2, dtype=torch.long),
                                     torch.zeros(0, dtype=torch.long)]), label="num_batches_tracked")
    training = data.draw(st.booleans(), label="training")
    momentum = data.draw(st.sampled_from([0.1, None, 0.5]), label="momentum")
    eps = data.draw(st.sampled_from([1e-5, 1e-5, 0.0, -1e-3]), label="eps")
    state = [None if t is None else t.clone() for t in (rm, rv, nbt)]
    core_state = [None if t is None else t.clone() for t in (rm, rv, nbt)]
    layer = f"BatchNorm{dims}d"
    record(f"torch.ops.matterhorn.batch_norm_layer({describe(x)}, {describe(w)}, {describe(b)}, {describe(rm)}, "
           f"{describe(rv)}, {describe(nbt)}, training={training}, momentum={momentum}, eps={eps}, layer={layer!r}, "
           f"num_features={num_features}, multi_step_mode=True)")
    result = outcome(lambda: ops.batch_norm_layer(x, w, b, rm, rv, nbt, training, momentum, eps, layer, num_features,
                                                  True))
    rm_, rv_, nbt_ = state

    def reference():
        # torch.nn's module: num_batches_tracked is updated by the module, the rest by F.batch_norm
        assert dims == d and num_features == C, "dims / num_features unlike the input"
        assert nbt_ is None or nbt_.dim() == 0, "num_batches_tracked must be a scalar"
        assert (rm_ is None) == (rv_ is None), "running_mean and running_var: both or neither (torch.nn's check)"
        assert all(t is None or list(t.shape) == [C] for t in (w, b, rm_, rv_)), "parameters of another size"
        factor = momentum
        if training and nbt_ is not None and rm_ is not None:
            nbt_.add_(1)
            if momentum is None:
                factor = 1.0 / float(nbt_)
        return F.batch_norm(x.flatten(0, 1), rm_, rv_, w, b, training or rm_ is None, 0.0 if factor is None else factor,
                            eps).unflatten(0, (T, B))
    expected = outcome(reference)
    if isinstance(expected, Raised):
        check_clean_error(result, "BatchNorm" if 1 <= dims <= 3 else "batch_norm")
        return
    assert not isinstance(result, Raised), f"torch.nn returns {describe(expected)}, matterhorn.batch_norm {result!r}"
    u = finfo_eps(torch.float64)
    folded = x.flatten(0, 1)
    batch = training or rm_ is None
    xg, mean, var, count = bn_statistics(folded, 1)
    if not batch:
        mean, var = state[0].reshape(1, 1, C, 1), state[1].reshape(1, 1, C, 1)
    bound = normalization_bound(xg, mean, var, count, eps, None if w is None else w.abs().reshape(1, 1, C, 1),
                                None if b is None else b.abs().reshape(1, 1, C, 1),
                                expected.flatten(0, 1).reshape(xg.shape), u, conditioned=batch)
    assert_close_bound(result, expected, bound.reshape(expected.shape), "matterhorn.batch_norm")
    second = (mean * mean + var).amax() if xg.numel() else torch.tensor(0.0, dtype=torch.float64)
    for got, want, what in zip((rm, rv), (rm_, rv_), ("running_mean", "running_var")):
        if got is not None:
            assert_close_bound(got, want, 4 * u * (count + 2) * (want.abs() + second), what)
    if nbt is not None:
        assert torch.equal(nbt, nbt_), f"num_batches_tracked {nbt.tolist()}, torch.nn {nbt_.tolist()}"
    # the core op on the folded tensor (one group) computes what the layer op did
    core = ops.batch_norm(x.flatten(0, 1), w, b, *core_state, training, momentum, eps).unflatten(0, (T, B))
    assert torch.equal(core, result), "matterhorn.batch_norm on the folded input differs from the layer op"
    for got, want in zip(core_state, (rm, rv, nbt)):
        assert got is None or torch.equal(got, want), "the core op updated the running statistics differently"


TEMPORAL_NORMS = [f"{kind}{d}d" for kind in ("ThresholdDependentBatchNorm", "TemporalEffectiveBatchNorm",
                                             "BatchNormThroughTime") for d in (1, 2, 3)]


@case
@given(data=st.data())
def test_temporal_norm_layers(data):
    """tdBN, TEBN and BNTT on drawn shapes (zero sizes included), layouts and options, and inputs
    whose T is not the layer's: the plain-torch definition's result (tests/test_temporal_norm.py),
    the same running statistics, or a clean error naming the layer."""
    from test_temporal_norm import bntt_definition, tdbn_definition, tebn_definition  # noqa: PLC0415
    name = data.draw(st.sampled_from(TEMPORAL_NORMS), label="layer")
    dims = int(name[-2])
    C, T = data.draw(st.integers(1, 3), label="C"), data.draw(st.integers(1, 3), label="T")
    steps = data.draw(st.sampled_from([T] * 5 + [T + 1, 0]), label="input T")
    B = data.draw(st.integers(0, 3), label="B")
    spatial = [data.draw(st.integers(0, 3), label="spatial")
               for _ in range(dims if dims > 1 else data.draw(st.integers(0, 1), label="L?"))]
    kwargs = dict(momentum=data.draw(st.sampled_from([0.1, None]), label="momentum"),
                  affine=data.draw(st.booleans(), label="affine"),
                  track_running_stats=data.draw(st.booleans(), label="track_running_stats"),
                  batch_first=data.draw(st.booleans(), label="batch_first"), dtype=torch.float64)
    training = data.draw(st.booleans(), label="training")
    seed = data.draw(seeds, label="seed")
    leading = (0.5, 2.0) if name.startswith("Threshold") else (T,)
    layer = getattr(mth.snn, name)(*leading, C, **kwargs).train(training)
    randomize_parameters(layer, seed)
    shape = ([B, steps] if kwargs["batch_first"] else [steps, B]) + [C] + spatial
    x = make_tensor(shape, torch.float64, data.draw(st.sampled_from(LAYOUTS), label="layout"), "cpu", seed,
                    channel_dim=2)
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    state = [None if b is None else b.clone() for b in (layer.running_mean, layer.running_var,
                                                        layer.num_batches_tracked)]
    record(f"{name}({leading}, {C}, {kwargs}).train({training})({describe(x)})")
    result = outcome(lambda: layer(x))

    def reference():
        assert name.startswith("Threshold") or steps == T, "the input's T is not the layer's"
        definition = tdbn_definition if name.startswith("Threshold") else \
            tebn_definition if name.startswith("TemporalEffective") else bntt_definition
        time_major = x.transpose(0, 1) if kwargs["batch_first"] else x
        y = definition(time_major, params, state, training, layer.momentum, layer.eps)
        return y.transpose(0, 1) if kwargs["batch_first"] else y
    expected = outcome(reference)
    if isinstance(expected, Raised):
        check_clean_error(result, name)
        return
    assert not isinstance(result, Raised), f"the definition returns {describe(expected)}, {name} {result!r}"
    scale = 1 + (expected.abs().max().item() if expected.numel() else 0)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9 * scale, equal_nan=True)
    for got, want in zip((layer.running_mean, layer.running_var, layer.num_batches_tracked), state):
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, equal_nan=True)


# ---- LayerNorm ops ------------------------------------------------------------------------------

def draw_layer_norm_input(data, seed):
    normalized = [data.draw(st.integers(1, 4) if data.draw(st.integers(0, 9)) else st.integers(0, 1))
                  for _ in range(data.draw(st.integers(1, 2)))]
    lead = [data.draw(st.integers(0, 3)) for _ in range(data.draw(st.integers(0, 2)))]
    trailing = [s + data.draw(st.sampled_from([0] * 9 + [1])) for s in normalized]
    dtype = data.draw(st.sampled_from(FLOATS + [torch.int64]), label="dtype")
    x = make_tensor(lead + trailing, dtype, data.draw(st.sampled_from(LAYOUTS)), "cpu", seed)
    return x, normalized, dtype


def ln_param(data, normalized, dtype, seed, label):
    choice = data.draw(st.sampled_from(["none", "ok", "ok", "ok", "wrong", "float32"]), label=label)
    if choice == "none":
        return None
    shape = list(normalized) if choice != "wrong" else list(normalized) + [1]
    pdt = torch.float32 if choice == "float32" or not dtype.is_floating_point else dtype
    return make_tensor(shape, pdt, "contiguous", "cpu", seed)


def ln_valid(x, normalized, params, dtype):
    n = len(normalized)
    reduced = dtype in (torch.float16, torch.bfloat16)
    given = [p for p in params if p is not None]
    return (x.dim() >= n and list(x.shape[x.dim() - n:]) == list(normalized) and dtype.is_floating_point
            and all(list(p.shape) == list(normalized) and (p.dtype == dtype or (reduced and p.dtype == torch.float32))
                    for p in given)
            and len({p.dtype for p in given}) <= 1)  # weight and bias share a dtype, as torch's layer_norm asks


def ln_reference(x64, normalized):
    D = math.prod(normalized)
    rows = x64.reshape(x64.numel() // D if D else math.prod(x64.shape[:x64.dim() - len(normalized)]), D)
    mean = rows.mean(-1, keepdim=True)
    var = ((rows - mean) ** 2).mean(-1, keepdim=True)
    return rows, mean, var


@case
@given(data=st.data())
def test_layer_norm_ops(data):
    """layer_norm (the layer op) and layer_norm_normalize: F.layer_norm's verdict and float64 values
    (the layer op: at least one leading dimension, docs/API.md)."""
    seed = data.draw(seeds)
    x, normalized, dtype = draw_layer_norm_input(data, seed)
    w, b = ln_param(data, normalized, dtype, seed + 1, "weight"), ln_param(data, normalized, dtype, seed + 2, "bias")
    eps = data.draw(st.sampled_from([1e-5, 1e-5, 0.0, -1e-3, 1.0]), label="eps")
    x, w = maybe_meta(data, x, "x"), maybe_meta(data, w, "w")
    which = data.draw(st.sampled_from(["layer_norm", "layer_norm_normalize"]), label="op")
    record(f"torch.ops.matterhorn.{which}({describe(x)}, {normalized}, {describe(w)}, {describe(b)}, {eps})")
    result = outcome(lambda: getattr(ops, which)(x, normalized, w, b, eps))
    if which == "layer_norm":  # the layer's op: torch's verdict, with a leading dimension (docs/API.md)
        one_device = len({t.device.type for t in (x, w, b) if t is not None}) == 1
        # torch's verdict on CPU tensors of the same shapes and dtypes
        on_cpu = [t if t is None or t.device.type == "cpu" else torch.zeros(t.shape, dtype=t.dtype) for t in (x, w, b)]
        valid = one_device and x.dim() > len(normalized) and not isinstance(
            outcome(lambda: F.layer_norm(on_cpu[0], normalized, on_cpu[1], on_cpu[2], eps)), Raised)
    else:  # the building block: normalized sizes of 0 included, as torch's layer_norm
        valid = ln_valid(x, normalized, (w, b), dtype)

    def compare(r):
        y = r if which == "layer_norm" else r[0]
        assert y.shape == x.shape and y.dtype == x.dtype
        if y.device.type == "meta":
            return
        rows, mean, var = ln_reference(x.double(), normalized)
        y64 = F.layer_norm(x.double(), normalized, None if w is None else w.double(), None if b is None else b.double(), eps)
        D = rows.shape[1]
        u = u_of(dtype, *[p.dtype for p in (w, b) if p is not None])
        bound = normalization_bound(rows, mean, var, D, eps, None if w is None else w.double().abs().reshape(1, -1),
                                    None if b is None else b.double().abs().reshape(1, -1), y64.reshape(rows.shape), u)
        assert_close_bound(y.reshape(rows.shape), y64.reshape(rows.shape), bound, f"{which} output")
        if which == "layer_norm_normalize":
            lead = list(x.shape[:x.dim() - len(normalized)])
            m, rstd = r[1], r[2]
            assert list(m.shape) == lead and list(rstd.shape) == lead and m.dtype == acc_dtype(dtype)
            second = mean * mean + var
            assert_close_bound(m.reshape(-1, 1), mean, 4 * u * (D + 1) * second.sqrt(), "mean")
            assert_close_bound(rstd.reshape(-1, 1), (var + eps).rsqrt(),
                               4 * u * (D + 1) * second / (var + eps).abs() * (var + eps).abs().rsqrt(), "rstd")

    check_block(result, valid, [x, w, b], which, compare)


@case
@given(data=st.data())
def test_layer_norm_backward_op(data):
    seed = data.draw(seeds)
    x, normalized, dtype = draw_layer_norm_input(data, seed)
    w = ln_param(data, normalized, dtype, seed + 1, "weight")
    dy = draw_grad_output(data, x, seed + 2)
    lead = list(x.shape[:max(x.dim() - len(normalized), 0)])
    stat_shape = data.draw(st.sampled_from([lead] * 8 + [lead + [1], [max(math.prod(lead), 0) + 1]]), label="stat shape")
    stat_dtype = data.draw(st.sampled_from([acc_dtype(dtype)] * 5 + [torch.float16]), label="stat dtype")
    valid = ln_valid(x, normalized, (w,), dtype) and dy.shape == x.shape and dy.dtype == x.dtype and \
        stat_shape == lead and stat_dtype == acc_dtype(dtype)
    if valid:  # consistent statistics of x
        rows, mean, var = ln_reference(x.double(), normalized)
        mean_t = mean.reshape(lead).to(stat_dtype)
        rstd_t = (var + 1e-5).rsqrt().reshape(lead).to(stat_dtype)
    else:
        mean_t = make_tensor(stat_shape, stat_dtype, "contiguous", "cpu", seed + 3)
        rstd_t = make_tensor(stat_shape, stat_dtype, "contiguous", "cpu", seed + 4).abs()
    dy, x, mean_t, w = (maybe_meta(data, t, l) for t, l in [(dy, "dy"), (x, "x"), (mean_t, "mean"), (w, "w")])
    record(f"torch.ops.matterhorn.layer_norm_backward({describe(dy)}, {describe(x)}, {normalized}, {describe(mean_t)}, "
           f"{describe(rstd_t)}, {describe(w)})")
    result = outcome(lambda: ops.layer_norm_backward(dy, x, normalized, mean_t, rstd_t, w))

    def compare(r):
        dx, dw, db = r
        assert dx.shape == x.shape and dx.dtype == x.dtype
        if dx.device.type == "meta":
            return
        rows, _, _ = ln_reference(x.double(), normalized)
        m = mean_t.double().reshape(-1, 1)
        rstd = rstd_t.double().reshape(-1, 1)
        g = dy.double().reshape(rows.shape)
        wv = torch.ones(rows.shape[1], dtype=torch.float64) if w is None else w.double().reshape(-1)
        xhat = (rows - m) * rstd
        gw = g * wv
        D = rows.shape[1]
        expected = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
        u = u_of(dtype, mean_t.dtype, *([w.dtype] if w is not None else []))
        ax, ag = xhat.abs() + 1e-300, gw.abs()
        cond = 1 + (m * m) * rstd * rstd
        bound = 4 * u * (D + 2) * cond * rstd * (ag + ag.mean(-1, keepdim=True) + ax * (ag * ax).mean(-1, keepdim=True))
        assert_close_bound(dx.reshape(rows.shape), expected, bound, "layer_norm_backward grad_input")
        if w is not None:
            n = rows.shape[0]
            assert_close_bound(dw.reshape(-1), (g * xhat).sum(0), 4 * u * (n + 2) * cond.amax() * (g.abs() * ax).sum(0)
                               if n else torch.zeros(D), "grad_weight")
            assert_close_bound(db.reshape(-1), g.sum(0), 4 * u * (n + 2) * g.abs().sum(0), "grad_bias")

    check_block(result, valid, [dy, x, mean_t, rstd_t, w], "layer_norm_backward", compare)


# ---- weight standardisation: WSLinear, WSConv1d/2d/3d and their ops ------------------------------

WS_LAYERS = ["WSLinear", "WSConv1d", "WSConv2d", "WSConv3d"]


def ws_reference(w64, gamma64, beta64, eps):
    """matterhorn 2.0.0's effective weight in float64 (mean and variance constants to autograd),
    with per output channel K, rstd, |w - mean| and |mean| (what the statistics' rounding scales with)."""
    rows = w64.detach().flatten(1)
    shape = (w64.shape[0],) + (1,) * (w64.dim() - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # var of no values
        mean, var = rows.mean(1).view(shape), rows.var(1).view(shape)
    rstd = 1 / ((var * rows.shape[1]).sqrt() + eps)
    out = (w64 - mean) * rstd
    if gamma64 is not None:
        out = out * gamma64.view(shape)
    if beta64 is not None:
        out = out + beta64.view(shape)
    return dict(out=out, K=rows.shape[1], rstd=rstd, deviation=(w64.detach() - mean).abs(), mean=mean.abs(),
                gamma=1.0 if gamma64 is None else gamma64.detach().abs().view(shape),
                beta=0.0 if beta64 is None else beta64.detach().abs().view(shape))


def ws_weight_bound(ws, u_acc, u):
    """The standardised weight's rounding: the mean and variance of K values in the accumulation
    type (u_acc) relative to each value's distance from the mean plus the mean, the affine in
    u_acc, then one rounding to the dtype (u)."""
    scaled = (ws["deviation"] + ws["mean"]) * ws["rstd"].abs() * ws["gamma"]
    return 4 * u_acc * (ws["K"] + 4) * scaled + 4 * u_acc * ws["beta"] + u * ws["out"].detach().abs()


@case
@given(data=st.data())
def test_weight_standardized_layers(data):
    """WSLinear / WSConvNd: the twin (torch.nn Linear / ConvNd) on the folded input with matterhorn
    2.0.0's standardised weight; its verdict on shapes and dtypes, values and gradients on the CPU."""
    ws_layer_case(data, data.draw(st.sampled_from(WS_LAYERS), label="layer"))


@case
@given(data=st.data())
def test_weight_standardized_layers_valid(data):
    """test_weight_standardized_layers on valid layers (fan_in >= 2, eps >= 0) and non-empty CPU
    inputs only (its draws are mostly errors or empty tensors), every WS layer in each example."""
    for name in WS_LAYERS:
        ws_layer_case(data, name, valid=True)


def ws_layer_case(data, name, spike_input=False, valid=False):
    """valid: arguments the layer takes and a non-empty input of the layer's dtype on the CPU."""
    dims = 0 if name == "WSLinear" else int(name[-2])
    layer_dtype = data.draw(st.sampled_from(FLOATS), label="layer dtype")
    dtype = layer_dtype if valid else data.draw(
        st.sampled_from([layer_dtype] * valid_draws(spike_input) + FLOATS + NON_FLOATS), label="input dtype")
    bias = data.draw(st.booleans(), label="bias")
    affine = data.draw(st.booleans(), label="affine")
    eps = data.draw(st.sampled_from([1e-6, 0.1] if valid else [1e-6, 1e-6, 0.1, 0.0, -1e-3]), label="eps")
    smallest = 1 if valid else 0
    if dims == 0:
        in_c = data.draw(st.integers(2 if valid else 0, 5), label="in_features")
        out_c = data.draw(st.integers(smallest, 4), label="out")
        args, kwargs = (in_c, out_c), dict(bias=bias)
    else:
        groups = data.draw(st.sampled_from([1, 1, 2]), label="groups")
        in_c = data.draw(st.integers(1, 3), label="in_channels") * groups
        out_c = data.draw(st.integers(1, 3), label="out_channels") * groups
        # valid: a fan_in of 2 or more (the first kernel size 2 or 3)
        kernel = tuple(data.draw(st.integers(2 if valid and d == 0 else 1, 3), label="kernel") for d in range(dims))
        padding = data.draw(st.sampled_from([0, 1, "same"]), label="padding")
        mode = data.draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]), label="padding_mode")
        args, kwargs = (in_c, out_c, kernel), dict(padding=padding, padding_mode=mode, groups=groups, bias=bias)
    device = "cpu" if valid else draw_device(data, cpu=valid_draws(spike_input))
    multi = data.draw(st.booleans(), label="multi-step")
    seed = data.draw(seeds, label="seed")
    record(f"{name}{args} {kwargs} affine={affine} eps={eps}")
    cls, twin_cls = getattr(mth.snn, name), getattr(nn, name[2:])
    made = outcome(lambda: cls(*args, **kwargs, affine=affine, eps=eps, dtype=layer_dtype,
                               multi_time_step=multi if data.draw(st.booleans()) else None, spike_input=spike_input))
    twin = twin_cls(*args, **kwargs, dtype=layer_dtype)
    fan_in = twin.weight[0].numel() if twin.weight.shape[0] else twin.weight.shape[1:].numel()
    if eps < 0 or fan_in == 1:  # the API refuses them (docs/API.md); torch.nn has no such argument
        check_clean_error(made, name, types=(ValueError,))
        return
    assert not isinstance(made, Raised), f"{name}: {made!r}"
    ours = made
    randomize_parameters(ours, seed)
    with torch.no_grad():
        ours.gamma.copy_(ours.gamma.abs() + 0.5)  # a scale, as trained ones are
    w64, g64, b64 = (ours.weight.detach().double(), ours.gamma.detach().double(), ours.beta.detach().double())
    ws = ws_reference(w64, g64, b64, eps)
    twin.load_state_dict({"weight": ws["out"].to(layer_dtype), **({"bias": ours.bias.detach()} if bias else {})})
    ref_d, ours = place(twin, device), place(ours, device)
    if dims == 0:
        lead = [data.draw(st.integers(smallest, 3), label="leading") for _ in range(data.draw(st.integers(smallest, 3)))]
        shape = lead + [in_c if valid else data.draw(st.sampled_from([in_c] * 4 + [in_c + 1]), label="last")]
    else:
        lead = leading_shape(data, multi, smallest)
        # valid: sizes the kernel fits, over the padding (reflect needs padding < size)
        shape = lead + [in_c if valid else data.draw(st.sampled_from([in_c] * 5 + [in_c + 1]), label="channels")] + \
            [data.draw(st.integers(kernel[d] + 1, kernel[d] + 3) if valid else st.integers(1, 5), label="spatial")
             for d in range(dims)]
    x = make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS), label="layout"), input_device(device), seed,
                    channel_dim=len(lead) if dims else None)
    not_spikes, graph = draw_spike_input(data, x, ours) if spike_input else (False, True)
    requires_grad = dtype in (torch.float32, torch.float64) and dtype == layer_dtype and device == "cpu" and graph
    x.requires_grad_(requires_grad)
    folds = dims > 0 and x.dim() == dims + 3

    def run_ref(m, t):
        y = m(t.flatten(0, 1) if folds else t)
        return y.unflatten(0, x.shape[:2]) if folds else y

    def compare(y):
        u = u_of(dtype, layer_dtype)
        u_acc = finfo_eps(torch.float64 if layer_dtype == torch.float64 else torch.float32)
        w_leaf, g_leaf = w64.clone().requires_grad_(), g64.clone().requires_grad_()
        b_leaf = ours.bias.detach().double().requires_grad_() if bias else None
        x64 = x.detach().double().requires_grad_()
        twin64 = copy.deepcopy(ref_d).double()

        def f(xx, w, b):  # the twin with these tensors as its parameters
            return run_ref(lambda t: torch.func.functional_call(twin64, {"weight": w, **({"bias": b} if bias else {})},
                                                                (t,)), xx)

        w_std = ws_reference(w_leaf, g_leaf, b64, eps)["out"]
        y64 = f(x64, w_std, b_leaf)
        dy = grad_output_like(y, seed) if requires_grad else None
        bound, grad_bounds = bilinear_bounds(f, [x64, w_std.detach(), None if b_leaf is None else b_leaf.detach()],
                                             None if dy is None else dy.double(), u)
        weight_error = ws_weight_bound(ws, u_acc, finfo_eps(layer_dtype))
        ax = x64.detach().abs().requires_grad_()
        assert_close_bound(y, y64, bound + f(ax, weight_error, None).detach(), f"{name} output")
        if dy is None:
            return
        y.backward(dy)
        names = ["input", "weight"] + (["gamma"] if affine else []) + (["bias"] if bias else [])
        leaves = [x64, w_leaf] + ([g_leaf] if affine else []) + ([b_leaf] if bias else [])
        expected = dict(zip(names, torch.autograd.grad(y64, leaves, dy.double())))
        # the gradient of <dy, f> in the standardised weight, G: its terms' magnitude and its bound
        aw = w_std.detach().abs().requires_grad_()
        g_magnitude = torch.autograd.grad(f(ax.detach(), aw, None), aw, dy.double().abs())[0]
        relative = 4 * u_acc * (ws["K"] + 4)  # rstd's and the mean's rounding
        w_hat = ws["deviation"] * ws["rstd"].abs()
        bounds = {  # dx = G^T-map of the weight; dw = G * gamma * rstd; dgamma = sum(G * w_hat)
            "input": grad_bounds[0] + torch.autograd.grad(f(ax, weight_error, None), ax, dy.double().abs())[0],
            "weight": grad_bounds[1] * ws["gamma"] * ws["rstd"].abs() + (relative + u) * expected["weight"].abs(),
            "gamma": (grad_bounds[1] * w_hat + relative * g_magnitude * (ws["deviation"] + ws["mean"])
                      * ws["rstd"].abs()).flatten(1).sum(1) + u * expected.get("gamma", torch.zeros(())).abs(),
            "bias": grad_bounds[2] if bias else None,
        }
        actual = {"input": x.grad, "weight": ours.weight.grad, "gamma": ours.gamma.grad,
                  "bias": ours.bias.grad if bias else None}
        for what, e in expected.items():
            assert actual[what] is not None, f"{name}: no gradient for {what}"
            assert_close_bound(actual[what], e, bounds[what], f"{name} grad of {what}")
        assert ours.beta.grad is None and (affine or ours.gamma.grad is None)

    if dims == 0:
        wrong = "a 0-D input" if not shape else None
    else:
        wrong = None if x.shape[-dims - 1] == in_c else "channels unlike in_channels"
    # shapes are checked by the folded op, which names the base layer (docs/API.md)
    check_layer(ours, ref_d, x, name=(name, name[2:]), run_ref=run_ref, layer_dtype=layer_dtype, must_raise_reason=wrong,
                device=device, compare=compare, not_spikes=not_spikes and graph, folded=(lambda t: list(t.flatten(0, 1).shape)) if folds else None)


def ws_draw_per_channel(data, O, dtype, seed, label, valid=False):
    """gamma or beta: absent, [O] (mostly) or a wrong shape; sometimes another dtype (valid: absent or [O])."""
    shape = data.draw(st.sampled_from([[O], None] if valid else [None, [O], [O], [O], [O + 1], [O, 1], []]),
                      label=f"{label} shape")
    if shape is None:
        return None
    p_dtype = dtype if valid else data.draw(st.sampled_from([dtype] * 6 + FLOATS), label=f"{label} dtype")
    t = make_tensor(shape, p_dtype, "contiguous", "cpu", seed)
    return t.abs() + 0.5 if label == "gamma" and p_dtype.is_floating_point else t


@case
@given(data=st.data())
def test_weight_standardize_ops(data):
    """weight_standardize, weight_standardize_forward and weight_standardize_backward on drawn
    weights (any rank, zero sizes, fan_in 1), per-channel tensors, eps, dtypes, layouts and
    devices: a clean error where the contract (docs/API.md) refuses, else the float64 formula."""
    weight_standardize_ops_case(data)


@case
@given(data=st.data())
def test_weight_standardize_ops_valid(data):
    """test_weight_standardize_ops on valid, non-empty arguments only: its draws are mostly errors."""
    weight_standardize_ops_case(data, valid=True)


def weight_standardize_ops_case(data, valid=False):
    seed = data.draw(seeds, label="seed")
    which = data.draw(st.sampled_from(["weight_standardize", "weight_standardize_forward",
                                       "weight_standardize_backward"]), label="op")
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype") if valid else draw_dtype(data, "dtype")
    rank = data.draw(st.sampled_from([2, 3, 4, 5] if valid else [2, 2, 3, 4, 5, 1, 0]), label="rank")
    # valid: no zero size, and a fan_in of 2 or more
    shape = [data.draw(st.integers((2 if d == 1 else 1) if valid else 0, 4), label="size") for d in range(rank)]
    w = make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS), label="layout"), "cpu", seed, channel_dim=1,
                    offset=data.draw(st.sampled_from([0.0, 0.0, 100.0]), label="offset"))
    O = shape[0] if shape else 0
    gamma = ws_draw_per_channel(data, O, dtype, seed + 1, "gamma", valid)
    beta = ws_draw_per_channel(data, O, dtype, seed + 2, "beta", valid)
    eps = data.draw(st.sampled_from([1e-6, 0.1] if valid else [1e-6, 1e-6, 0.0, 0.1, -1e-3, math.nan]), label="eps")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fan_in = math.prod(shape[1:]) if rank >= 1 else 0
    floating = dtype.is_floating_point
    per_channel_ok = all(p is None or (list(p.shape) == [O] and p.dtype == dtype) for p in (gamma, beta))
    if which == "weight_standardize_backward":
        beta = None
        if valid:
            dy_shape, dy_dtype, stat_shape, stat_dtype = shape, dtype, [O], acc
        else:
            dy_shape = data.draw(st.sampled_from([shape] * 6 + [shape[:-1]]), label="dy shape")
            dy_dtype = data.draw(st.sampled_from([dtype] * 6 + FLOATS), label="dy dtype")
            stat_shape = data.draw(st.sampled_from([[O]] * 6 + [[O + 1]]), label="stat shape")
            stat_dtype = data.draw(st.sampled_from([acc] * 6 + [torch.float16]), label="stat dtype")
        dy = make_tensor(dy_shape, dy_dtype, "contiguous", "cpu", seed + 3)
        mean = make_tensor(stat_shape, stat_dtype, "contiguous", "cpu", seed + 4)
        rstd = make_tensor(stat_shape, stat_dtype, "contiguous", "cpu", seed + 5).abs()
        valid = floating and rank >= 2 and list(dy.shape) == shape and dy.dtype == dtype and stat_shape == [O] and \
            stat_dtype == acc and (gamma is None or (list(gamma.shape) == [O] and gamma.dtype == dtype))
        tensors = [maybe_meta(data, t, label, valid) for t, label in [(dy, "dy"), (w, "w"), (mean, "mean"), (rstd, "rstd"),
                                                                (gamma, "gamma")]]
        record(f"torch.ops.matterhorn.weight_standardize_backward({', '.join(describe(t) for t in tensors)})")
        result = outcome(lambda: ops.weight_standardize_backward(*tensors))
        dy, w, mean, rstd, gamma = tensors
    else:
        valid = floating and rank >= 2 and fan_in != 1 and per_channel_ok and eps >= 0
        w, gamma, beta = (maybe_meta(data, t, label, valid) for t, label in [(w, "w"), (gamma, "gamma"), (beta, "beta")])
        record(f"torch.ops.matterhorn.{which}({describe(w)}, {describe(gamma)}, {describe(beta)}, {eps})")
        result = outcome(lambda: getattr(ops, which)(w, gamma, beta, eps))
    u, u_acc = finfo_eps(dtype) if floating else 0, finfo_eps(acc)

    def compare(r):
        if which == "weight_standardize_backward":
            dw, dgamma, dbeta = r
            assert dw.shape == w.shape and dw.dtype == dtype and list(dbeta.shape) == [O] and dbeta.dtype == dtype
            assert list(dgamma.shape) == ([O] if gamma is not None else [0])
            if dw.device.type == "meta":
                return
            shape1 = (O,) + (1,) * (w.dim() - 1)
            d64, w64, m64, r64 = dy.double(), w.double(), mean.double().view(shape1), rstd.double().view(shape1)
            g64 = gamma.double().view(shape1) if gamma is not None else torch.ones(shape1, dtype=torch.float64)
            expected_dw = d64 * g64 * r64
            assert_close_bound(dw, expected_dw, 4 * (u_acc + u) * expected_dw.abs(), "grad_weight")
            terms = (d64 * (w64 - m64) * r64).flatten(1)
            assert_close_bound(dbeta, d64.flatten(1).sum(1), 2 * u_acc * (fan_in + 2) * d64.flatten(1).abs().sum(1)
                               + u * d64.flatten(1).sum(1).abs(), "grad_beta")
            if gamma is not None:
                scale = (d64.abs() * ((w64 - m64).abs() + m64.abs() + w64.abs()) * r64).flatten(1).sum(1)
                assert_close_bound(dgamma, terms.sum(1), 4 * u_acc * (fan_in + 4) * scale + u * terms.sum(1).abs(),
                                   "grad_gamma")
            return
        out = r if which == "weight_standardize" else r[0]
        assert out.shape == w.shape and out.dtype == dtype
        if which == "weight_standardize_forward":
            assert [list(t.shape) for t in r[1:]] == [[O]] * 2 and r[1].dtype == acc and r[2].dtype == acc
        if out.device.type == "meta":
            return
        ws = ws_reference(w.double(), None if gamma is None else gamma.double(), None if beta is None else beta.double(),
                          eps)
        assert_close_bound(out, ws["out"], ws_weight_bound(ws, u_acc, u), f"{which} output")

    check_block_named(result, valid, [t for t in (w, gamma, beta) if t is not None] if which != "weight_standardize_backward"
                      else [dy, w, mean, rstd, gamma], which, ("weight_standardize",), compare)


def check_block_named(result, valid, tensors, op, names, compare):
    """check_block for ops whose errors name `names`."""
    mixed = len({t.device.type for t in tensors if t is not None}) > 1
    if not valid or mixed:
        check_clean_error(result, (op, *names))
        return
    assert not isinstance(result, Raised), f"{op} on valid arguments {result!r}"
    compare(result)


# ---- spike input: the spike ops, pack_spikes / unpack_spikes, layers with spike_input=True ---------

def dense_layout(size, stride):
    """Non-overlapping and dense: the dimensions of size 2 or more, ordered by stride, tile memory
    from offset 0 without gaps."""
    expected = 1
    for d in sorted((d for d in range(len(size)) if size[d] > 1), key=lambda d: stride[d]):
        if stride[d] != expected:
            return False
        expected *= size[d]
    return True


def contiguous_strides(size):
    strides, step = [], 1
    for s in reversed(size):
        strides.insert(0, step)
        step *= max(s, 1)
    return strides


def packed_strides(x):
    """The layout pack_spikes reads x in (docs/API.md): x's own when non-overlapping and dense, else
    its contiguous copy's."""
    return list(x.stride()) if dense_layout(x.shape, x.stride()) else contiguous_strides(x.shape)


def reference_bits(x, strides):
    """pack_spikes' format in plain torch: the value at memory offset k (of `strides`) in bit k % 8 of byte k // 8."""
    flat = torch.zeros(x.numel(), dtype=torch.float64)
    flat.as_strided(x.shape, strides).copy_(x)
    ones = F.pad((flat == 1).to(torch.int64), (0, -x.numel() % 8))
    return (ones.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def reference_unpack(bits, size, stride, dtype):
    """unpack_spikes in plain torch: bit k % 8 of byte k // 8 at memory offset k of `stride`."""
    values = ((bits.to(torch.int64)[:, None] >> torch.arange(8)) & 1).flatten()[:math.prod(size)]
    return values.to(dtype).as_strided(size, stride)


def draw_spike_shape(data):
    """A rank 0 to 4 shape (zero sizes included), sometimes with a long last dimension (the kernels'
    vector bodies and their tails)."""
    shape = [data.draw(st.integers(0, 4), label="size") for _ in range(data.draw(st.integers(0, 4), label="rank"))]
    if shape and data.draw(st.booleans(), label="a long row?"):
        shape[-1] = data.draw(st.integers(5, 300), label="row")
    return shape


def pack_case(data):
    """pack_spikes on drawn shapes, dtypes, layouts (permuted, one element off the buffer's start
    too) and devices: a TypeError for a non-floating input, a ValueError naming the layer for a
    non-spike (on the CPU), else the plain-torch bits; unpack_spikes of them gives the input back."""
    seed = data.draw(seeds, label="seed")
    layer = data.draw(st.sampled_from([None, "Conv2d"]), label="layer")
    names = ("pack_spikes",) if layer is None else (layer, "pack_spikes")
    shape = draw_spike_shape(data)
    dtype = draw_dtype(data, "dtype")
    device = data.draw(st.sampled_from(["cpu"] * 5 + ["meta"]), label="device")
    layout = data.draw(st.sampled_from(LAYOUTS + ["permuted", "offset"]), label="layout")
    if layout == "permuted":
        order = data.draw(st.permutations(range(len(shape))), label="order")
        x = make_tensor([shape[d] for d in order], dtype, "contiguous", device, seed).permute(
            [order.index(d) for d in range(len(shape))])
    elif layout == "offset":  # unaligned vector loads
        x = make_tensor([math.prod(shape) + 1], dtype, "contiguous", device, seed)[1:].view(shape)
    else:
        x = make_tensor(shape, dtype, layout, device, seed, channel_dim=1)
    not_spikes = draw_spikes(data, x)
    record(f"torch.ops.matterhorn.pack_spikes({describe(x)}, layer={layer!r}), a non-spike: {not_spikes}")
    result = outcome(lambda: ops.pack_spikes(x) if layer is None else ops.pack_spikes(x, layer))
    if not dtype.is_floating_point:
        check_clean_error(result, names, types=(TypeError,))
        return
    if not_spikes:
        check_not_spikes(result, names)
        return
    assert not isinstance(result, Raised), f"pack_spikes {result!r}"
    bits, invalid = result
    assert bits.dtype == torch.uint8 and list(bits.shape) == [-(-x.numel() // 8)] and bits.device == x.device
    assert invalid.dtype == torch.uint8 and invalid.dim() == 0 and invalid.device == x.device
    strides = packed_strides(x)
    if device == "cpu":
        assert torch.equal(bits, reference_bits(x, strides)), f"bits {bits.tolist()}"
        assert int(invalid) == 0
    out_dtype = data.draw(st.sampled_from([dtype] * 3 + FLOATS), label="unpack dtype")
    flag = data.draw(st.sampled_from([invalid, None]), label="invalid")
    y = ops.unpack_spikes(bits, flag, list(x.shape), strides, out_dtype)
    assert y.shape == x.shape and list(y.stride()) == strides and y.dtype == out_dtype and y.device == x.device, \
        f"unpack_spikes gave {describe(y)}, expected strides {strides}"
    if device == "cpu":
        assert torch.equal(y, x.to(out_dtype)), "the round trip differs from the input"


def unpack_case(data):
    """unpack_spikes on drawn bits (the unused bits of the last byte random too) and hostile
    arguments: bits of another length, rank or dtype, a stride that is not a dense permutation or
    of another rank, a negative or overflowing size, a set, misshaped or misplaced `invalid` flag,
    a non-floating dtype. One thing wrong: its exception type; several: any clean error; none:
    the plain-torch unpacking in exactly that layout."""
    seed = data.draw(seeds, label="seed")
    layer = data.draw(st.sampled_from([None, "Linear"]), label="layer")
    names = ("unpack_spikes",) if layer is None else (layer, "unpack_spikes")
    shape = draw_spike_shape(data)
    rank, n = len(shape), math.prod(shape)
    order = data.draw(st.permutations(range(rank)), label="memory order")
    in_memory = contiguous_strides([shape[d] for d in order])
    stride = [in_memory[order.index(d)] for d in range(rank)]
    problems = []  # (what, exception types)
    size_kind = data.draw(st.sampled_from(["drawn"] * 12 + ["negative", "overflow"]), label="size kind")
    if size_kind == "negative" and rank:
        shape[0] = -1
        problems.append(("a negative size", (ValueError,)))
    if size_kind == "overflow":  # 2**64 (+ 4) values: the count wraps to 0 (4) in int64
        extra = data.draw(st.sampled_from([0, 1]), label="wrapped count")
        shape, stride, n = [2**62 + extra, 4], [4, 1], 4 * extra
        problems.append(("more values than int64 counts", ALLOWED))
    stride_kind = data.draw(st.sampled_from(["dense"] * 8 + ["gap", "negative", "rank"]), label="stride kind")
    if stride_kind == "gap" and rank:
        stride[-1] *= 2
    elif stride_kind == "negative" and rank:
        stride[0] = -stride[0]
    elif stride_kind == "rank":
        stride = stride + [1]
        problems.append(("a stride of another rank", (ValueError,)))
    if len(stride) == len(shape) and min(shape, default=0) >= 0:
        # an empty tensor (or a dimension of size 1) has no values a stride could misplace: either verdict
        if not dense_layout(shape, stride):
            problems.append(("a stride that is no dense permutation", (ValueError,) if n else "either"))
        elif min(stride, default=0) < 0:
            problems.append(("a negative stride", "either"))
    nbytes = -(-n // 8)
    length = data.draw(st.sampled_from([nbytes] * 8 + [nbytes + 1, max(nbytes - 1, 0)]), label="bits length")
    bits_shape = [length] if data.draw(st.integers(0, 9), label="bits rank 2?") else [1, length]
    if bits_shape != [nbytes]:
        problems.append(("bits of another shape", (ValueError,)))
    bits_dtype = data.draw(st.sampled_from([torch.uint8] * 8 + [torch.int8, torch.float32]), label="bits dtype")
    if bits_dtype != torch.uint8:
        problems.append(("bits of another dtype", (TypeError,)))
    device = data.draw(st.sampled_from(["cpu"] * 5 + ["meta"]), label="device")
    bits = torch.randint(0, 256, bits_shape, generator=torch.Generator().manual_seed(seed)).to(bits_dtype).to(device)
    flag_kind = data.draw(st.sampled_from(["none", "zero"] * 3 + ["set", "float", "shape", "device"]), label="invalid")
    flag = {"none": None, "zero": torch.zeros((), dtype=torch.uint8, device=device),
            "set": torch.ones((), dtype=torch.uint8, device=device),
            "float": torch.zeros((), dtype=torch.float32, device=device),
            "shape": torch.zeros(1, dtype=torch.uint8, device=device),
            "device": torch.zeros((), dtype=torch.uint8, device="meta" if device == "cpu" else "cpu")}[flag_kind]
    if flag_kind == "float":
        problems.append(("an invalid flag of another dtype", (TypeError,)))
    elif flag_kind in ("shape", "device"):
        problems.append((f"an invalid flag of another {flag_kind}", (ValueError,)))
    dtype = draw_dtype(data, "dtype")
    if not dtype.is_floating_point:
        problems.append(("a non-floating dtype", (TypeError,)))
    set_flag = flag_kind == "set" and device == "cpu"  # the meta kernel reads no value
    record(f"torch.ops.matterhorn.unpack_spikes({describe(bits)}, {describe(flag)}, {shape}, {stride}, {dtype}, "
           f"layer={layer!r}); problems {[p for p, _ in problems]}, a set flag: {set_flag}")
    arguments = (bits, flag, shape, stride, dtype) + (() if layer is None else (layer,))
    result = outcome(lambda: ops.unpack_spikes(*arguments))
    strict = [types for _, types in problems if types != "either"]
    if strict:
        check_clean_error(result, names, types=strict[0] if len(strict) == 1 and len(problems) == 1 else ALLOWED)
        return
    if problems:  # "either": a clean error, or a tensor of that shape
        if isinstance(result, Raised):
            check_clean_error(result, names)
        else:
            assert list(result.shape) == shape and result.dtype == dtype, f"unpack_spikes gave {describe(result)}"
        return
    if set_flag:
        check_not_spikes(result, names)
        return
    assert not isinstance(result, Raised), f"unpack_spikes {result!r}"
    assert list(result.shape) == shape and list(result.stride()) == stride and result.dtype == dtype \
        and result.device == bits.device, f"unpack_spikes gave {describe(result)}, expected strides {stride}"
    if device == "cpu":
        assert torch.equal(result, reference_unpack(bits, shape, stride, dtype)), "the values differ from the bits'"


@case
@given(data=st.data())
def test_spike_ops(data):
    """The spike ops (docs/API.md "Spike input"): spike_linear, spike_conv and spike_conv_transpose
    as the dense ops' properties draw them, on 0/1 inputs, against torch on the folded tensor and
    the dense op (output and gradients); a non-spike value where a graph is recorded is a ValueError
    naming the layer; pack_spikes / unpack_spikes against a plain-torch bit layout."""
    which = data.draw(st.sampled_from(["spike_linear", "spike_conv", "pack_spikes", "unpack_spikes"]), label="op")
    {"spike_linear": lambda: linear_op_case(data, spike=True), "spike_conv": lambda: conv_op_case(data, spike=True),
     "pack_spikes": lambda: pack_case(data), "unpack_spikes": lambda: unpack_case(data)}[which]()


@case
@given(data=st.data())
def test_spike_input_layers(data):
    """Linear, ConvNd, ConvTransposeNd and WS layers with spike_input=True, drawn as their dense
    properties draw them, on 0/1 inputs: torch.nn on the folded tensor is the verdict for the output
    and the gradients; a non-spike value where a graph is recorded is a ValueError naming the layer."""
    name = data.draw(st.sampled_from(["Linear"] + CONVS + WS_LAYERS), label="layer")
    if name == "Linear":
        linear_layer_case(data, spike_input=True)
    elif name in CONVS:
        conv_layer_case(data, name, spike_input=True)
    else:
        ws_layer_case(data, name, spike_input=True)


# ---- MultiheadAttention ------------------------------------------------------------------------------

def mha_inputs(data, layer, T, S, batch, unbatched, dtype, device, seed):
    """query, key, value in the layer's terms (self-attention: the query three times where the
    sizes allow), each possibly hostile: another rank, width, batch or S. Returns them and the
    problems (what the API must refuse)."""
    problems = []

    def sequence(steps, features, k):
        shape = [steps, features] if unbatched else \
            [batch[0], steps, *batch[1:], features] if layer.batch_first else [steps, *batch, features]
        hostile = data.draw(st.sampled_from(["none"] * 12 + ["rank", "width", "batch", "steps"]), label=f"hostile {k}")
        if hostile == "rank":
            shape = shape[1:] if data.draw(st.booleans(), label="drop a dimension?") or len(shape) > 3 else [1] + shape
        elif hostile == "width":
            shape[-1] += 1
        elif hostile == "batch" and not unbatched and k:  # a key or value unlike the query
            shape[0 if layer.batch_first else 1] += 1
        elif hostile == "steps" and k == 2:  # a value unlike the key
            shape[1 if layer.batch_first and not unbatched else 0] += 1
        return make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS), label=f"layout {k}"), device, seed + k)

    query = sequence(T, layer.embed_dim, 0)
    self_attention = layer.kdim == layer.vdim == layer.embed_dim and data.draw(st.booleans(), label="self-attention")
    key, value = (query, query) if self_attention else (sequence(S, layer.kdim, 1), sequence(S, layer.vdim, 2))
    time = 1 if layer.batch_first and query.dim() > 2 else 0
    for name, x, features in (("query", query, layer.embed_dim), ("key", key, layer.kdim), ("value", value, layer.vdim)):
        if x.dim() < 2 or x.shape[-1] != features:
            problems.append(f"the {name}'s rank or width")
        elif name != "query" and x.dim() != query.dim():
            problems.append(f"the {name}'s rank unlike the query's")
        elif name != "query" and x.dim() > 2 and (x.shape[:time] + x.shape[time + 1:-1]
                                                  != query.shape[:time] + query.shape[time + 1:-1]):
            problems.append(f"the {name}'s batch unlike the query's")
    if key.shape[:-1] != value.shape[:-1]:
        problems.append("key and value of other sizes")
    return query, key, value, problems


def mha_mask(data, label, shapes, bad_shape, device, float_dtype):
    """None, or a mask of one of `shapes` (else bad_shape), bool or float (one draw in ten an
    integer dtype, or another device). Returns the mask and its problem (or None)."""
    kind = data.draw(st.sampled_from(["none"] * 3 + list(range(len(shapes))) * 2 + ["shape"]), label=f"{label} shape")
    if kind == "none":
        return None, None
    shape = bad_shape if kind == "shape" else shapes[kind]
    # a float mask in the query's dtype: torch.nn raises its own RuntimeError for another one
    dtype = data.draw(st.sampled_from([torch.bool] * 5 + [float_dtype] * 4 + [torch.int64]), label=f"{label} dtype")
    where = data.draw(st.sampled_from([device] * 9 + ["meta" if device == "cpu" else "cpu"]), label=f"{label} device")
    g = torch.Generator().manual_seed(len(shape))
    mask = torch.rand(shape, generator=g) < 0.3  # a few positions masked (a whole row now and then)
    mask = mask if dtype == torch.bool else mask.to(dtype) * -1e4 if dtype.is_floating_point else mask.to(dtype)
    problem = "the mask's dtype" if dtype == torch.int64 else "the mask's device" if where != device else \
        "the mask's shape" if kind == "shape" else None
    return mask.to(where), problem


@case
@given(data=st.data())
def test_multihead_attention_layer(data):
    """MultiheadAttention (multi-step only, [T, B, ..., C] or [B, T, ..., C]) on drawn sizes (zero
    ones included), kdim/vdim, biases, masks and hostile inputs: a ValueError or TypeError naming
    the layer, or nn.MultiheadAttention on the folded [T, B*N, C] ([B*N, T, C] batch_first) with
    the same parameters: the same outputs, weights and input gradients (the same ATen calls on
    the same values)."""
    heads = data.draw(st.sampled_from([2, 1, 3]), label="heads")
    embed = heads * data.draw(st.sampled_from([2, 1]), label="head dim")
    kdim, vdim = (data.draw(st.sampled_from([None, None, 1, 3]), label=label) for label in ("kdim", "vdim"))
    kwargs = dict(bias=data.draw(st.booleans(), label="bias"), add_bias_kv=data.draw(st.booleans(), label="add_bias_kv"),
                  add_zero_attn=data.draw(st.booleans(), label="add_zero_attn"), kdim=kdim, vdim=vdim,
                  batch_first=data.draw(st.booleans(), label="batch_first"))
    layer_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="layer dtype")
    dtype = data.draw(st.sampled_from([layer_dtype] * 8 + [torch.float16, torch.float32, torch.float64, torch.int64]),
                      label="input dtype")
    device = data.draw(st.sampled_from(["cpu"] * 8 + ["meta", "meta-input"]), label="device")
    # rare choices last in sampled_from: Hypothesis favours the first element (and small integers)
    single_step = data.draw(st.sampled_from([False] * 14 + [True]), label="single-step?")
    seed = data.draw(seeds, label="seed")
    ours = mth.snn.MultiheadAttention(embed, heads, **kwargs, dtype=layer_dtype, multi_time_step=not single_step)
    randomize_parameters(ours, seed)
    ref = nn.MultiheadAttention(embed, heads, **kwargs, dtype=layer_dtype)
    ref.load_state_dict(ours.state_dict())
    ours, ref = place(ours, device), place(ref, device)
    unbatched = data.draw(st.sampled_from([False] * 9 + [True]), label="unbatched?")
    size = st.sampled_from([2, 1, 3, 0])  # zero sizes included
    batch = [] if unbatched else [data.draw(size, label="B")] + [
        data.draw(size, label="N") for _ in range(data.draw(st.sampled_from([1, 0, 2]), label="extra dims"))]
    T, S = data.draw(size, label="T"), data.draw(size, label="S")
    query, key, value, problems = mha_inputs(data, ours, T, S, batch, unbatched, dtype, input_device(device), seed)
    if key is query and query.dim() >= 2 and query.dim() != len(batch) + 2:
        # a hostile rank the layer takes as another batch (self-attention: key and value follow)
        unbatched = query.dim() == 2
        time = 1 if ours.batch_first and not unbatched else 0
        batch = [] if unbatched else [s for d, s in enumerate(query.shape[:-1]) if d != time]
        T = query.shape[time]
    S = T if key is query else S  # self-attention
    sequences = math.prod(batch)
    padding, padding_problem = mha_mask(data, "key_padding_mask", [[S]] if unbatched else [batch + [S], batch[:1] + [S]],
                                        [S + 1] if unbatched else batch + [S + 1], input_device(device), layer_dtype)
    attn, attn_problem = mha_mask(data, "attn_mask", [[T, S], [sequences * heads, T, S]] + ([] if unbatched else
                                  [batch + [heads, T, S]]), [T + 1, S], input_device(device), layer_dtype)
    need_weights = data.draw(st.booleans(), label="need_weights")
    average = data.draw(st.booleans(), label="average_attn_weights")
    is_causal = data.draw(st.sampled_from([False] * 9 + [True]), label="is_causal?")
    problems += [p for p in (padding_problem, attn_problem) if p]
    if single_step:
        problems.append("single-step mode")
    if dtype != layer_dtype:
        problems.append(f"an input of dtype {dtype} to a {layer_dtype} layer")
    if device == "meta-input":
        problems.append("a meta input to a CPU layer")
    if is_causal and attn is None:
        problems.append("is_causal without attn_mask")
    requires_grad = device == "cpu" and dtype == layer_dtype
    for x in {id(t): t for t in (query, key, value)}.values():
        x.requires_grad_(requires_grad)
    keywords = dict(key_padding_mask=padding, need_weights=need_weights, attn_mask=attn,
                    average_attn_weights=average, is_causal=is_causal)
    record(f"{ours!r} {kwargs}, device {device}\n  query {describe(query)}, key {describe(key)}, value "
           f"{describe(value)}, key_padding_mask {describe(padding)}, attn_mask {describe(attn)}, need_weights "
           f"{need_weights}, average {average}, is_causal {is_causal}; problems {problems}")
    result = outcome(lambda: ours(query, key, value, **keywords))
    if problems:
        check_clean_error(result, "MultiheadAttention", types=(ValueError, TypeError))
        return

    def fold(x):  # [T, B, ..., C] -> [T, B*N, C]; batch_first [B, T, ..., C] -> [B*N, T, C]
        if unbatched:
            return x
        return x.movedim(1, -2).flatten(0, -3) if ours.batch_first else x.flatten(1, -2)

    def unfold(y):
        if unbatched:
            return y
        return y.unflatten(0, batch).movedim(-2, 1) if ours.batch_first else y.unflatten(1, batch)

    folded = {}
    for x in (query, key, value):  # the same tensor folded once: torch.nn's self-attention path
        folded.setdefault(id(x), fold(x))
    ref_padding = padding
    if padding is not None and not unbatched:  # [B, ..., S], or [B, S] for every extra position
        if list(padding.shape) != batch + [S]:
            padding = padding.reshape(batch[:1] + [1] * (len(batch) - 1) + [S]).expand(batch + [S])
        ref_padding = padding.flatten(0, -2)
    ref_attn = attn if attn is None or attn.dim() == 2 else attn.reshape(sequences * heads, T, S)
    expected = outcome(lambda: ref(folded[id(query)], folded[id(key)], folded[id(value)],
                                   **dict(keywords, key_padding_mask=ref_padding, attn_mask=ref_attn)))
    if isinstance(expected, Raised):  # torch.nn's own error on the folded tensor, passed through unnamed
        check_clean_error(result, types=ALLOWED)
        return
    assert not isinstance(result, Raised), f"torch.nn returns {describe(expected[0])}, MultiheadAttention {result!r}"
    (y, w), (y_ref, w_ref) = result, expected
    y_ref = unfold(y_ref)
    w_ref = w_ref if w_ref is None or unbatched else w_ref.unflatten(0, batch)
    assert (w is None) == (w_ref is None), f"weights {describe(w)}, torch.nn {describe(w_ref)}"
    for what, a, e in (("output", y, y_ref), ("weights", w, w_ref)):
        if e is None:
            continue
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device, \
            f"{what}: {describe(a)}, torch.nn {describe(e)}"
        if device == "cpu":
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
    if not requires_grad or not y.numel():
        return
    dy = grad_output_like(y, seed)
    leaves = list({id(t): t for t in (query, key, value)}.values())
    got = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    want = torch.autograd.grad(y_ref, leaves, dy, allow_unused=True)
    for k, (a, e) in enumerate(zip(got, want)):
        assert (a is None) == (e is None), f"gradient {k}: {describe(a)}, torch.nn {describe(e)}"
        if a is not None:
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"gradient {k}: {m}")


# Every public op has a case above (checked by tests/test_fuzz.py against the registered ops).
FUZZED_OPS = {
    "linear": test_linear_op, "conv": test_conv_ops, "conv_transpose": test_conv_ops,
    "batch_norm": test_batch_norm_op, "batch_norm_stats": test_batch_norm_stats_op,
    **{n: test_batch_norm_op for n in ("batch_norm_layer", "batch_norm_layer_fold", "batch_norm_layer_unfold")},
    "batch_norm_elemt": test_batch_norm_elemt_op, "batch_norm_backward_reduce": test_batch_norm_backward_reduce_op,
    "batch_norm_backward_elemt": test_batch_norm_backward_elemt_op,
    "batch_norm_update_stats": test_batch_norm_update_stats_op, "batch_norm_normalize": test_batch_norm_normalize_op,
    "layer_norm": test_layer_norm_ops, "layer_norm_normalize": test_layer_norm_ops,
    "layer_norm_backward": test_layer_norm_backward_op,
    **{n: test_spike_ops for n in ("spike_linear", "spike_conv", "spike_conv_transpose", "pack_spikes",
                                   "unpack_spikes")},
    **{n: test_weight_standardize_ops for n in ("weight_standardize", "weight_standardize_forward",
                                                "weight_standardize_backward")},
}
FUZZED_LAYERS = {
    "Linear": test_linear_layer, **{n: test_conv_layers for n in CONVS},
    **{n: test_batch_norm_layers for n in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")},
    "LayerNorm": test_layer_norm_layer, **{n: test_weight_standardized_layers for n in WS_LAYERS},
    **{n: test_temporal_norm_layers for n in TEMPORAL_NORMS},
    "MultiheadAttention": test_multihead_attention_layer,
}
