"""BatchNorm against torch.nn on the folded tensor, and the BatchNorm ops (LayerNorm: test_layer_norm.py)."""

import copy
import inspect

import pytest
import torch
import torch.nn as nn

import matterhorn_pytorch as mth
from samples import (BATCH_NORM_SAMPLES, DEVICES, assert_within, check_against_reference, check_no_derivative, opcheck,
                     rounding, sum_error)

# (class name, input size after [T, B] / [B]: C first, memory formats to try)
BN_SHAPES = [
    ("BatchNorm1d", (5,), ["contiguous"]),
    ("BatchNorm1d", (5, 7), ["contiguous", "channels_last"]),
    ("BatchNorm2d", (4, 5, 6), ["contiguous", "channels_last"]),
    ("BatchNorm3d", (3, 4, 3, 5), ["contiguous", "channels_last"]),
    # channels_last reductions work on blocks of 32 channels: two whole blocks and a part
    ("BatchNorm2d", (70, 3, 2), ["contiguous", "channels_last"]),
]
OPTIONS = {
    "default": dict(),
    "momentum=None": dict(momentum=None),
    "affine=False": dict(affine=False),
    # BatchNorm's constructor is torch.nn's: bias=False where torch has it (2.13 does, 2.11 does not)
    **({"bias=False": dict(bias=False)} if "bias" in inspect.signature(nn.BatchNorm1d).parameters else {}),
    "no running stats": dict(track_running_stats=False),
    "eps,momentum": dict(eps=1e-3, momentum=0.3),
}


def make_input(leading, size, layout, dtype):
    """[*leading, C, ...] with the channels innermost in memory for "channels_last"."""
    if layout == "channels_last":
        return torch.randn(*leading, *size[1:], size[0], dtype=dtype).movedim(-1, len(leading))
    return torch.randn(*leading, *size, dtype=dtype)


def twins(name, kwargs, dtype, **extras):
    ours = getattr(mth.snn, name)(size_c := 0 or kwargs.pop("num_features"), **kwargs, dtype=dtype, **extras)
    reference = getattr(nn, name)(size_c, **kwargs, dtype=dtype)
    if ours.weight is not None:
        with torch.no_grad():  # non-trivial affine so that its gradients matter
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-0.5, 0.5)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def assert_same_state(ours, reference):
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{name}.grad: {m}")


@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: f"{s[0]}-{len(s[1])}d")
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["multi-step", "single-step", "batch_first"])
def test_batch_norm_equals_torch_on_the_folded_tensor(shape, option, dtype, mode):
    name, size, layouts = shape
    T, B = 3, 4
    ours, reference = twins(name, dict(num_features=size[0], **OPTIONS[option]), dtype,
                            batch_first=mode == "batch_first")
    if mode == "single-step":
        ours.single_step_mode_()
    for step, layout in enumerate(layouts * 2):  # several training steps, every layout
        leading = (B,) if mode == "single-step" else (B, T) if mode == "batch_first" else (T, B)
        x = make_input(leading, size, layout, dtype).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y = ours(x)
        y_ref = reference(x_ref) if mode == "single-step" else reference(x_ref.flatten(0, 1)).unflatten(0, leading)
        torch.testing.assert_close(y, y_ref)
        if layout == "channels_last" and len(size) > 1:
            assert y.movedim(len(leading), -1).is_contiguous()  # the layout is kept
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad)
        assert_same_state(ours, reference)
    ours.eval(), reference.eval()
    x = make_input((B,) if mode == "single-step" else (T, B), size, "contiguous", dtype)
    if mode == "batch_first":
        x = x.transpose(0, 1)
    expected = reference(x) if mode == "single-step" else reference(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    torch.testing.assert_close(ours(x), expected)


@pytest.mark.parametrize("name,size", [("BatchNorm1d", (3,)), ("BatchNorm2d", (3, 4, 5)), ("BatchNorm3d", (2, 3, 2, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("batch_first", [False, True])
def test_per_step_equals_a_loop_of_torch_batch_norm_over_t(name, size, momentum, batch_first):
    T, B = 4, 3
    ours, reference = twins(name, dict(num_features=size[0], momentum=momentum), torch.float64,
                            per_step=True, batch_first=batch_first)
    assert "per_step=True" in repr(ours)
    for _ in range(2):
        x = torch.randn(T, B, *size, dtype=torch.float64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y = ours(x.transpose(0, 1)).transpose(0, 1) if batch_first else ours(x)
        y_ref = torch.stack([reference(x_ref[t]) for t in range(T)])  # T calls: T running-stat updates
        torch.testing.assert_close(y, y_ref)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad)
        assert_same_state(ours, reference)
    assert int(ours.num_batches_tracked) == 2 * T
    ours.eval(), reference.eval()
    x = torch.randn(T, B, *size, dtype=torch.float64)
    torch.testing.assert_close(ours(x.transpose(0, 1)).transpose(0, 1) if batch_first else ours(x),
                               torch.stack([reference(x[t]) for t in range(T)]))


def test_batch_norm_bfloat16_input_with_float32_parameters():
    # torch.nn in float64 on the same rounded values; ours sums N = T*B*H*W values per channel in
    # float32 and rounds the output once to bfloat16
    T, B, N = 2, 3, 2 * 3 * 5 * 5
    ours = mth.snn.BatchNorm2d(4)
    reference = nn.BatchNorm2d(4, dtype=torch.float64)
    x = (torch.randn(T, B, 4, 5, 5) + 2).bfloat16()
    y = ours(x)
    assert y.dtype == torch.bfloat16
    x64 = x.double()
    y_ref = reference(x64.flatten(0, 1)).unflatten(0, (T, B))
    dims = (0, 1, 3, 4)
    rstd = (x64.var(dims, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    shift = rstd * x64.abs().mean(dims, keepdim=True)  # a float32 mean is off by N eps times |x|
    assert_within(y, y_ref, rounding(torch.bfloat16) * y_ref.abs() + sum_error(N) * (y_ref.abs() + shift))
    assert_within(ours.running_mean, reference.running_mean, sum_error(N) * 0.1 * x64.abs().mean(dims))
    assert_within(ours.running_var, reference.running_var, sum_error(N) * reference.running_var)
    assert ours.running_mean.dtype == ours.running_var.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_building_blocks_round_like_torch_casts(dtype, layout):
    # float32 accumulation either way: the element passes' results are the float32 path's on the
    # same values, rounded to nearest even as .to(dtype) does (vectors convert 16 values at a
    # time); the reductions agree to float32 rounding (the compiler may fuse multiply-adds
    # differently per dtype). C = 70: two whole blocks of 32 channels and a part; 37 values per
    # row: vectors and a tail
    ops = torch.ops.matterhorn
    x = make_input((4,), (70, 37), layout, torch.float32).mul(3).to(dtype)
    dy = make_input((4,), (70, 37), layout, torch.float32).to(dtype)
    w, b = torch.rand(70) + 0.5, torch.randn(70)
    mean, var = ops.batch_norm_stats(x, 2)
    mean32, var32 = ops.batch_norm_stats(x.float(), 2)
    torch.testing.assert_close((mean, var), (mean32, var32), rtol=1e-5, atol=1e-6)
    y = ops.batch_norm_elemt(x, mean, var, w, b, 1e-5, 2)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ops.batch_norm_elemt(x.float(), mean, var, w, b, 1e-5, 2).to(dtype), rtol=0, atol=0)
    sums = ops.batch_norm_backward_reduce(dy, x, mean, 2)
    torch.testing.assert_close(sums, ops.batch_norm_backward_reduce(dy.float(), x.float(), mean, 2), rtol=1e-5, atol=1e-5)
    dx = ops.batch_norm_backward_elemt(dy, x, mean, var, w, *sums, 1e-5, 2 * 37, 2)
    dx32 = ops.batch_norm_backward_elemt(dy.float(), x.float(), mean, var, w, *sums, 1e-5, 2 * 37, 2)
    torch.testing.assert_close(dx, dx32.to(dtype), rtol=0, atol=0)


def eval_twins():
    ours, reference = twins("BatchNorm2d", dict(num_features=3), torch.float32)
    ours.running_mean.uniform_(-1, 1), ours.running_var.uniform_(0.5, 2)
    reference.load_state_dict(ours.state_dict())
    return ours.eval(), reference.eval()


def test_eval_normalizes_with_the_running_statistics_and_returns_no_copies_of_them():
    ours, reference = eval_twins()
    x = torch.randn(8, 3, 4, 4)
    y, mean, var = torch.ops.matterhorn.batch_norm_normalize(
        x, ours.weight, ours.bias, ours.running_mean, ours.running_var, False, ours.eps, 1)
    torch.testing.assert_close(y, reference(x))
    assert mean.numel() == 0 and var.numel() == 0


@pytest.mark.parametrize("needs_grad", ["input", "weight", "nothing", "no_grad"])
def test_eval_records_a_graph_exactly_when_a_gradient_is_needed(needs_grad):
    ours, reference = eval_twins()
    x = torch.randn(2, 4, 3, 5, 5, requires_grad=needs_grad == "input")
    x_ref = x.detach().clone().requires_grad_(needs_grad == "input")
    for layer in (ours, reference):
        layer.requires_grad_(needs_grad == "weight")
    with torch.set_grad_enabled(needs_grad != "no_grad"):
        y, y_ref = ours(x), reference(x_ref.flatten(0, 1)).unflatten(0, (2, 4))
    torch.testing.assert_close(y, y_ref)
    assert y.requires_grad == y_ref.requires_grad == (needs_grad in ("input", "weight"))
    if y.requires_grad:
        grad = torch.randn_like(y)
        y.backward(grad), y_ref.backward(grad)
        if needs_grad == "input":
            torch.testing.assert_close(x.grad, x_ref.grad)
        else:
            torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
            torch.testing.assert_close(ours.bias.grad, reference.bias.grad)


def test_eval_backward_after_the_running_statistics_changed_raises_like_torch():
    ours, _ = eval_twins()
    y = ours(torch.randn(2, 4, 3, 5, 5, requires_grad=True))
    ours.running_var.mul_(2)  # the backward would use the new values: refused, not silently wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("wrt", ["input", "weight", "bias", "weight and bias"])
def test_training_gradients_of_some_inputs_only_equal_torch(wrt):
    ours, reference = twins("BatchNorm2d", dict(num_features=3), torch.float64)
    x = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), reference(x_ref.flatten(0, 1)).unflatten(0, (2, 4))
    pick = {"input": lambda layer, x: [x], "weight": lambda layer, x: [layer.weight],
            "bias": lambda layer, x: [layer.bias], "weight and bias": lambda layer, x: [layer.weight, layer.bias]}[wrt]
    grad = torch.randn_like(y)
    for ours_grad, reference_grad in zip(torch.autograd.grad(y, pick(ours, x), grad),
                                         torch.autograd.grad(y_ref, pick(reference, x_ref), grad)):
        torch.testing.assert_close(ours_grad, reference_grad)


def test_backward_twice_needs_retain_graph_and_then_accumulates_like_torch():
    ours, reference = twins("BatchNorm2d", dict(num_features=3), torch.float64)
    x = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), reference(x_ref.flatten(0, 1)).unflatten(0, (2, 4))
    grad = torch.randn_like(y)
    for _ in range(2):
        y.backward(grad, retain_graph=True), y_ref.backward(grad, retain_graph=True)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    y.backward(grad)  # frees what the node saved
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward(grad)


def test_saved_tensor_hooks_see_what_the_backward_saves():
    ours, reference = twins("BatchNorm2d", dict(num_features=3), torch.float64)
    x = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()  # as an offloading hook would: the backward must use what unpack returns

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ours(x)
    assert torch.Size([8, 3, 5, 5]) in packed  # the folded input
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref.flatten(0, 1)).unflatten(0, (2, 4)).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_forward_mode_ad_equals_torch_nn():
    layer, reference = twins("BatchNorm2d", dict(num_features=2), torch.float64)
    x, tangent = torch.randn(2, 2, 2, 3, 3, dtype=torch.float64), torch.randn(2, 2, 2, 3, 3, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        y = layer(torch.autograd.forward_ad.make_dual(x, tangent))
        y_ref = reference(torch.autograd.forward_ad.make_dual(x, tangent).flatten(0, 1))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(y).tangent,
                                   torch.autograd.forward_ad.unpack_dual(y_ref).tangent.unflatten(0, (2, 2)))
    assert_same_state(layer, reference)  # the running statistics were updated once, with no tangent


# Double backward and forward-mode AD, as LayerNorm's: the ATen composition where our kernels have
# no formulas, checked numerically (gradgradcheck; gradcheck of the forward-mode derivatives).
@pytest.mark.parametrize("name,args,kwargs", [
    ("BatchNorm2d", (2,), dict()), ("BatchNorm2d", (2,), dict(per_step=True)),
    ("BatchNorm2d", (2,), dict(affine=False)), ("TemporalEffectiveBatchNorm2d", (3, 2), dict()),
    ("BatchNormThroughTime2d", (3, 2), dict()),
], ids=["BatchNorm2d", "per_step", "affine=False", "TEBN", "BNTT"])
def test_gradcheck_gradgradcheck_and_forward_ad_float64(name, args, kwargs):
    layer = getattr(mth.snn, name)(*args, dtype=torch.float64, **kwargs)
    x = torch.randn(3, 2, 2, 2, 1, dtype=torch.float64, requires_grad=True)
    params = {k: v.detach().clone().uniform_(0.5, 1.5).requires_grad_() for k, v in layer.named_parameters()}

    def run(x, *values):
        return torch.func.functional_call(layer, dict(zip(params, values)), (x,))

    for training in (True, False):  # batch statistics, then the running ones: another backward path
        layer.train(training)
        assert torch.autograd.gradcheck(run, (x, *params.values()), check_forward_ad=True, check_batched_grad=False)
        assert torch.autograd.gradgradcheck(run, (x, *params.values()))


def loop_of_batch_norm(x, params, state, training, momentum, eps):
    """per_step=True: torch's batch norm per time step, one running-statistics update per step."""
    rm, rv, _ = state
    return torch.stack([torch.nn.functional.batch_norm(x[t], rm, rv, params.get("weight"), params.get("bias"),
                                                       training, momentum, eps) for t in range(x.shape[0])])


@pytest.mark.parametrize("name,args,kwargs", [
    ("BatchNorm2d", (2,), dict()), ("BatchNorm2d", (2,), dict(per_step=True)),
    ("BatchNorm2d", (2,), dict(affine=False)), ("TemporalEffectiveBatchNorm2d", (3, 2), dict()),
    ("BatchNormThroughTime2d", (3, 2), dict()),
], ids=["BatchNorm2d", "per_step", "affine=False", "TEBN", "BNTT"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_vjp_and_hessian_equal_the_definition(name, args, kwargs, training):
    """torch.func.vjp and jacrev(jacrev) (which differentiate with create_graph=True, on tensors of
    a finished transform) against the plain-torch definition, in float64."""
    from test_temporal_norm import bntt_definition, tdbn_definition, tebn_definition  # noqa: PLC0415
    layer = getattr(mth.snn, name)(*args, dtype=torch.float64, **kwargs).train(training)
    definition = bntt_definition if "ThroughTime" in name else tebn_definition if "Effective" in name else \
        loop_of_batch_norm if kwargs.get("per_step") else tdbn_definition
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
        layer.running_mean.uniform_(-0.5, 0.5), layer.running_var.uniform_(0.5, 1.5)
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    x = torch.randn(3, 2, 2, 2, 1, dtype=torch.float64)

    def ours(x, params):  # the running statistics of a copy: each call starts from the same state
        return torch.func.functional_call(copy.deepcopy(layer), params, (x,))

    def reference(x, params):
        state = [layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()]
        return definition(x, params, state, training, layer.momentum, layer.eps)

    cotangent = torch.randn_like(x)
    y, back = torch.func.vjp(ours, x, params)
    y_ref, back_ref = torch.func.vjp(reference, x, params)
    torch.testing.assert_close(y, y_ref)
    (dx, dparams), (dx_ref, dparams_ref) = back(cotangent), back_ref(cotangent)
    torch.testing.assert_close(dx, dx_ref)
    for k in params:
        torch.testing.assert_close(dparams[k], dparams_ref[k], msg=lambda m: f"{k}: {m}")
    cubed = lambda f: lambda x: f(x, params).pow(3).sum()  # noqa: E731 - a non-quadratic loss
    hessian = torch.func.jacrev(torch.func.jacrev(cubed(ours)))(x)
    torch.testing.assert_close(hessian, torch.func.jacrev(torch.func.jacrev(cubed(reference)))(x))


@pytest.mark.parametrize("name,args,kwargs,training", [
    ("BatchNorm2d", (2,), dict(), False), ("BatchNorm2d", (2,), dict(track_running_stats=False), True),
    ("BatchNorm2d", (2,), dict(per_step=True, track_running_stats=False), True),
    ("BatchNormThroughTime2d", (3, 2), dict(), False), ("TemporalEffectiveBatchNorm2d", (3, 2), dict(), False),
], ids=["eval", "batch-statistics", "per_step", "BNTT-eval", "TEBN-eval"])
def test_vmap_and_per_example_gradients_equal_a_loop(name, args, kwargs, training):
    """torch.vmap over a batch of inputs, and vmap(grad) (per-example gradients), as torch.nn's
    BatchNorm allows: each example on its own. Training with running statistics is refused under
    vmap, as torch.nn refuses it (the update would need a batch of buffers)."""
    layer = getattr(mth.snn, name)(*args, dtype=torch.float64, **kwargs).train(training)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
        if layer.running_mean is not None:
            layer.running_mean.uniform_(-0.5, 0.5), layer.running_var.uniform_(0.5, 1.5)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(4, 3, 2, 2, 2, 3, dtype=torch.float64)  # 4 examples of [T, B, C, H, W]

    def loss(params, example):
        return torch.func.functional_call(layer, params, (example,)).pow(3).sum()

    torch.testing.assert_close(torch.vmap(layer)(x), torch.stack([layer(e) for e in x]))
    per_example = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for k in params:
        expected = torch.stack([torch.func.grad(loss)(params, e)[k] for e in x])
        torch.testing.assert_close(per_example[k], expected, msg=lambda m: f"{k}: {m}")
    if training:
        with pytest.raises(ValueError, match=r"BatchNorm under torch.vmap in training would update its running "
                                             r"statistics.*call eval\(\), or build the layer with track_running_stats"):
            torch.vmap(getattr(mth.snn, name)(*args, dtype=torch.float64))(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", [s for s in BATCH_NORM_SAMPLES if s.op in (
    "batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt")],
    ids=lambda s: f"{s.op}-{s.id}")
def test_building_blocks_have_no_derivative(sample, device):
    check_no_derivative(sample, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", BATCH_NORM_SAMPLES, ids=lambda s: f"{s.op}-{s.id}")
def test_op_equals_torch_nn_or_a_float64_formula(sample, device):
    check_against_reference(sample, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", BATCH_NORM_SAMPLES, ids=lambda s: f"{s.op}-{s.id}")
def test_opcheck(sample, device):
    opcheck(sample.overload, sample.build(device))


@pytest.mark.parametrize("sample", [s for s in BATCH_NORM_SAMPLES if s.gradcheck], ids=lambda s: f"{s.op}-{s.id}")
def test_op_gradcheck_forward_ad_and_gradgradcheck_float64(sample):
    """As LayerNorm's ops (tests/test_layer_norm.py): first-, second-order and forward-mode derivatives."""
    args = sample.build("cpu")
    where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(*tensors):
        values = list(args)
        for i, t in zip(where, tensors):
            values[i] = t
        return sample.overload(*values)[0]

    inputs = tuple(args[i] for i in where)
    assert torch.autograd.gradcheck(run, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(run, inputs)


# ---- errors in the user's terms ---------------------------------------------------------------

class TestErrors:
    def test_wrong_channel_count(self):
        with pytest.raises(ValueError, match=r"BatchNorm2d\(num_features=3\): expected 3 channels at dimension 2 "
                                             r"\(C in \[T, B, C, H, W\].*got \[2, 4, 4, 5, 5\]"):
            mth.snn.BatchNorm2d(3)(torch.randn(2, 4, 4, 5, 5))

    def test_wrong_channel_count_single_step(self):
        with pytest.raises(ValueError, match=r"expected 3 channels at dimension 1.*got \[4, 4, 5, 5\]"):
            mth.snn.BatchNorm2d(3)(torch.randn(4, 4, 5, 5))

    @pytest.mark.parametrize("name,shape", [("BatchNorm2d", (2, 3, 4)), ("BatchNorm1d", (2, 3, 4, 5, 6)),
                                            ("BatchNorm3d", (2, 3, 4, 5))])
    def test_wrong_rank_lists_both_modes(self, name, shape):
        with pytest.raises(ValueError, match=rf"{name}: expected input .* in multi-step mode.* in "
                                             rf"single-step mode; got a {len(shape)}-D tensor"):
            getattr(mth.snn, name)(3)(torch.randn(*shape))

    def test_one_value_per_channel_in_training(self):
        with pytest.raises(ValueError, match=r"BatchNorm1d: expected more than 1 value per channel in training; "
                                             r"got input \[1, 1, 3\]"):
            mth.snn.BatchNorm1d(3)(torch.randn(1, 1, 3))
        mth.snn.BatchNorm1d(3).eval()(torch.randn(1, 1, 3))  # eval is fine

    def test_one_value_per_channel_and_step_with_per_step(self):
        with pytest.raises(ValueError, match=r"more than 1 value per channel and time step"):
            mth.snn.BatchNorm1d(3, per_step=True)(torch.randn(4, 1, 3))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match=r"BatchNorm2d: the input's dtype torch.float64 does not match the layer's "
                                            r"weight dtype torch.float32"):
            mth.snn.BatchNorm2d(3)(torch.randn(2, 2, 3, 4, 4, dtype=torch.float64))

    def test_bad_num_features(self):
        with pytest.raises(ValueError, match=r"BatchNorm2d: num_features must be .* >= 1, got 0"):
            mth.snn.BatchNorm2d(0)


@pytest.mark.parametrize("name,args,kwargs", [
    ("BatchNorm2d", (3,), dict()), ("BatchNorm2d", (3,), dict(per_step=True, affine=False)),
    ("TemporalEffectiveBatchNorm2d", (2, 3), dict()), ("BatchNormThroughTime2d", (2, 3), dict()),
    ("LayerNorm", ((4, 5),), dict()),
], ids=["BatchNorm2d", "per_step", "TEBN", "BNTT", "LayerNorm"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_autograd_of_a_training_step_equals_eager(name, args, kwargs, training):
    """The backward traced by compiled autograd (the nodes' compiled_args / apply_with_saved) gives
    eager's gradients."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters
    layer = getattr(mth.snn, name)(*args, **kwargs).train(training)
    x = torch.randn(2, 3, 3, 4, 5, requires_grad=True)
    grad = torch.randn(2, 3, 3, 4, 5)

    def gradients(compiled):
        x.grad = None
        layer.zero_grad()
        y = layer(x)
        if compiled:
            compiled_autograd.reset()  # a fresh cache: this backward is captured, not looked up
            captures = counters["compiled_autograd"]["captures"]
            with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
                y.backward(grad)
            assert counters["compiled_autograd"]["captures"] == captures + 1  # traced, not run eagerly
        else:
            y.backward(grad)
        return [x.grad] + [p.grad for p in layer.parameters()]

    expected = gradients(False)
    for got, want in zip(gradients(True), expected):
        torch.testing.assert_close(got, want)


def test_a_parametrized_weight_is_used_as_in_torch_nn():
    # torch.nn.utils.parametrize moves the weight out of the parameter dict and computes it on access
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, weight):
            return weight.abs() + 1

    ours, reference = mth.snn.BatchNorm2d(3), nn.BatchNorm2d(3)
    reference.load_state_dict(ours.state_dict())
    for layer in (ours, reference):
        parametrize.register_parametrization(layer, "weight", Positive())
    x = torch.randn(2, 4, 3, 5, 5)
    torch.testing.assert_close(ours(x), reference(x.flatten(0, 1)).unflatten(0, (2, 4)))
