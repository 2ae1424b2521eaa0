"""The temporal normalizations (tdBN, TEBN, BNTT) against their definitions in plain torch:
forward, every gradient and the running statistics over several training calls, then eval;
1d/2d/3d, contiguous and channels_last, float32 / bfloat16, batch_first; gradcheck in float64;
errors in the layer's terms."""

import copy

import pytest
import torch
import torch.nn.functional as F

import matterhorn_pytorch as mth

T, B = 4, 3
# (spatial dims, size after C, memory formats)
SHAPES = [(1, (), ["contiguous"]), (1, (5,), ["contiguous", "channels_last"]),
          (2, (4, 5), ["contiguous", "channels_last"]), (3, (3, 2, 4), ["contiguous", "channels_last"])]
C = 6


def make_input(size, layout, dtype, batch_first=False):
    """[T, B, C, *size] (or [B, T, ...]) with the channels innermost in memory for "channels_last"."""
    leading = (B, T) if batch_first else (T, B)
    if layout == "channels_last":
        return torch.randn(*leading, *size, C, dtype=dtype).movedim(-1, 2)
    return torch.randn(*leading, C, *size, dtype=dtype)


def per_channel(t, x):
    """[C] -> broadcastable over [N, C, ...]."""
    return t.view(-1, *([1] * (x.dim() - 2)))


def folded_batch_norm(x, weight, bias, state, training, momentum, eps):
    """F.batch_norm on [T*B, C, ...] (x time-major), state = [running_mean, running_var, num_batches_tracked]."""
    rm, rv, nbt = state
    factor = momentum
    if training and rm is not None:
        nbt += 1
        factor = momentum if momentum is not None else 1.0 / float(nbt)
    y = F.batch_norm(x.flatten(0, 1), rm, rv, weight, bias, training or rm is None, factor or 0.0, eps)
    return y.unflatten(0, x.shape[:2])


def tdbn_definition(x, params, state, training, momentum, eps):
    return folded_batch_norm(x, params.get("weight"), params.get("bias"), state, training, momentum, eps)


def tebn_definition(x, params, state, training, momentum, eps):
    y = folded_batch_norm(x, params.get("weight"), params.get("bias"), state, training, momentum, eps)
    return y * params["scale"].view(-1, *([1] * (x.dim() - 1))).to(y.dtype)


def bntt_definition(x, params, state, training, momentum, eps):
    """A loop of bias-free BatchNorm per step: step t's weight and running statistics."""
    rm, rv, nbt = state
    factor = momentum
    if training and rm is not None:
        nbt += 1
        factor = momentum if momentum is not None else 1.0 / float(nbt)
    weight = params.get("weight")
    steps = [F.batch_norm(x[t], None if rm is None else rm[t], None if rv is None else rv[t],
                          None if weight is None else weight[t], None, training or rm is None, factor or 0.0, eps)
             for t in range(x.shape[0])]
    return torch.stack(steps)


KINDS = {
    "tdBN": ("ThresholdDependentBatchNorm", (0.5, 2.0), tdbn_definition),
    "TEBN": ("TemporalEffectiveBatchNorm", (T,), tebn_definition),
    "BNTT": ("BatchNormThroughTime", (T,), bntt_definition),
}


def build(kind, dims, dtype, **kwargs):
    name, leading, definition = KINDS[kind]
    layer = getattr(mth.snn, f"{name}{dims}d")(*leading, C, **kwargs)
    with torch.no_grad():  # parameters away from their initial values, so that every one matters
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 1.5)
    return layer.to(dtype), definition


def reference_state(layer):
    if layer.running_mean is None:
        return [None, None, None]
    return [layer.running_mean.detach().double().clone(), layer.running_var.detach().double().clone(),
            layer.num_batches_tracked.clone()]


def check_calls(layer, definition, size, layouts, dtype, momentum, batch_first=False):
    """Two training calls per layout, then eval: outputs, input and parameter gradients, running
    statistics against the definition computed in float64 from the same values."""
    state = reference_state(layer)
    # bfloat16: values and parameters rounded to 8 bits; float32 accumulation in both
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for training in (True, True, False):
        layer.train(training)
        for layout in layouts if training else ["contiguous"]:
            x = make_input(size, layout, dtype, batch_first).requires_grad_()
            params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
            x64 = x.detach().double().requires_grad_()
            time_major = x64.transpose(0, 1) if batch_first else x64
            expected = definition(time_major, params, state, training, momentum, layer.eps)
            expected = expected.transpose(0, 1) if batch_first else expected
            layer.zero_grad()
            y = layer(x)
            assert y.shape == x.shape and y.dtype == dtype
            torch.testing.assert_close(y.double(), expected, **tolerance)
            grad = torch.randn_like(expected).to(dtype)  # the same rounded values for both
            y.backward(grad)
            expected.backward(grad.double())
            torch.testing.assert_close(x.grad.double(), x64.grad, **tolerance)
            for n, p in layer.named_parameters():
                torch.testing.assert_close(p.grad.double(), params[n].grad, **tolerance, msg=lambda m: f"{n}: {m}")
            if state[0] is not None:
                torch.testing.assert_close(layer.running_mean.double(), state[0], **tolerance)
                torch.testing.assert_close(layer.running_var.double(), state[1], **tolerance)
                assert torch.equal(layer.num_batches_tracked, state[2])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}d-{len(s[1])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_its_definition(kind, shape, dtype):
    dims, size, layouts = shape
    layer, definition = build(kind, dims, dtype)
    check_calls(layer, definition, size, layouts, dtype, 0.1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", ["batch_first", "momentum=None", "affine=False", "no running stats"])
def test_options_equal_the_definition(kind, option):
    kwargs = {"batch_first": dict(batch_first=True), "momentum=None": dict(momentum=None),
              "affine=False": dict(affine=False), "no running stats": dict(track_running_stats=False)}[option]
    layer, definition = build(kind, 2, torch.float32, **kwargs)
    check_calls(layer, definition, (3, 4), ["contiguous", "channels_last"], torch.float32, layer.momentum,
                batch_first=option == "batch_first")


def test_tdbn_initialises_the_weight_to_alpha_times_v_th_and_is_batch_norm():
    layer = mth.snn.ThresholdDependentBatchNorm2d(0.5, 3.0, 4)
    assert torch.equal(layer.weight, torch.full((4,), 1.5)) and not layer.bias.any()
    assert isinstance(layer, torch.nn.BatchNorm2d) and "alpha=0.5, v_th=3.0" in repr(layer)
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.full((4,), 1.5))


def test_state_dicts_and_shapes_follow_the_spec():
    tebn = mth.snn.TemporalEffectiveBatchNorm2d(5, 3)
    assert tebn.scale.shape == (5,) and torch.equal(tebn.scale, torch.ones(5))
    assert set(tebn.state_dict()) == set(torch.nn.BatchNorm2d(3).state_dict()) | {"scale"}
    bntt = mth.snn.BatchNormThroughTime2d(5, 3)
    assert bntt.weight.shape == (5, 3) and bntt.bias is None
    assert bntt.running_mean.shape == bntt.running_var.shape == (5, 3)
    assert set(bntt.state_dict()) == {"weight", "running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize("kind", ["TEBN", "BNTT"])
def test_gradcheck_float64(kind):
    layer, _ = build(kind, 1, torch.float64)
    x = torch.randn(T, 2, C, 3, dtype=torch.float64, requires_grad=True)
    params = dict(layer.named_parameters())

    def run(x, *values):
        return torch.func.functional_call(layer, dict(zip(params, values)), (x,))
    assert torch.autograd.gradcheck(run, (x, *params.values()))
    layer.eval()
    assert torch.autograd.gradcheck(run, (x, *params.values()))


@pytest.mark.parametrize("kind,name", [("TEBN", "TemporalEffectiveBatchNorm2d"), ("BNTT", "BatchNormThroughTime2d")])
def test_another_number_of_steps_is_a_clear_error(kind, name):
    layer, _ = build(kind, 2, torch.float32)
    with pytest.raises(ValueError, match=rf"{name}: expected T = 4 time steps .*got 3"):
        layer(torch.randn(3, 2, C, 4, 4))
    with pytest.raises(ValueError, match=rf"{name}: expected input \[T, B, C, H, W\] \(multi-step only\)"):
        layer(torch.randn(2, C, 4, 4))
    with pytest.raises(ValueError, match=rf"{name}: T \(time steps\) must be an integer >= 1, got 0"):
        getattr(mth.snn, name)(0, C)
    with pytest.raises(ValueError, match=rf"{name}: a multi-step layer"):
        layer.single_step_mode_()


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bntt_without_per_step_tensors_still_checks_its_steps(batch_first, training):
    """affine=False, track_running_stats=False: no per-step tensor holds T; another T (an empty
    batch too) is still the layer's ValueError, eager and scripted, and the layer's T runs."""
    layer = mth.snn.BatchNormThroughTime2d(T, C, affine=False, track_running_stats=False,
                                           batch_first=batch_first).train(training)
    scripted = torch.jit.script(layer)
    for steps, batch in ((T + 1, B), (T - 1, B), (T + 1, 0)):
        x = torch.randn(*((batch, steps) if batch_first else (steps, batch)), C, 4, 5)
        with pytest.raises(ValueError, match=rf"BatchNormThroughTime2d: expected T = {T} time steps \(the layer's T\), "
                                             rf"got {steps}"):
            layer(x)
        with pytest.raises(torch.jit.Error, match=rf"expected T = {T} time steps"):
            scripted(x)
    x = make_input((4, 5), "contiguous", torch.float32, batch_first)
    torch.testing.assert_close(scripted(x), layer(x))


def test_bntt_eval_uses_step_t_running_statistics_for_step_t():
    layer = mth.snn.BatchNormThroughTime1d(3, 2).eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    x = torch.full((3, 4, 2), 2.0)
    y = layer(x)
    expected = (2.0 - torch.tensor([0.0, 1.0, 2.0])) / (1 + layer.eps) ** 0.5
    torch.testing.assert_close(y, expected.view(3, 1, 1).expand(3, 4, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_torchscript_equals_eager(kind):
    layer, _ = build(kind, 2, torch.float32)
    scripted = torch.jit.script(layer)
    x = make_input((3, 4), "contiguous", torch.float32)
    layer.eval(), scripted.eval()
    torch.testing.assert_close(scripted(x), layer(x))


def test_compiled_training_steps_equal_eager():
    """torch.compile (fullgraph, AOTAutograd) of TEBN and BNTT in a sequence: forward, every gradient, the
    running statistics, and eval."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(mth.snn.TemporalEffectiveBatchNorm2d(T, C), mth.snn.BatchNormThroughTime2d(T, C))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True, dynamic=False)
    for training in (True, True, False):
        model.train(training), twin.train(training)
        x = make_input((3, 4), "channels_last", torch.float32).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = model(x), compiled(x2)
        torch.testing.assert_close(y2, y)
        grad = torch.randn_like(y)
        y.backward(grad), y2.backward(grad)
        torch.testing.assert_close(x2.grad, x.grad)
        for (n, p), p2 in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p2.grad, p.grad, msg=lambda m: f"{n}: {m}")
        for (n, b), b2 in zip(model.named_buffers(), twin.buffers()):
            torch.testing.assert_close(b2, b, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_export_runs_like_eager(training):
    model = torch.nn.Sequential(mth.snn.ThresholdDependentBatchNorm1d(0.5, 2.0, C),
                                mth.snn.TemporalEffectiveBatchNorm1d(T, C), mth.snn.BatchNormThroughTime1d(T, C))
    model.train(training)
    x = make_input((5,), "contiguous", torch.float32)
    twin = copy.deepcopy(model)
    exported = torch.export.export(twin, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    for (n, b), b2 in zip(model.named_buffers(), exported.module().buffers()):
        torch.testing.assert_close(b2, b, msg=lambda m: f"{n}: {m}")
