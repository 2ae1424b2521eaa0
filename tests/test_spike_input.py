"""spike_input=True: the synapses keep their input for backward as bits (matterhorn::pack_spikes),
with the forward and every gradient of the dense path. Bytes saved for backward are measured with
saved-tensor hooks; gradients are compared with torch.nn on the folded tensor; the pack / unpack
ops are checked against a plain-torch bit layout, by opcheck, and their CUDA kernels under the CPU
emulation (tests/emulation)."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

import matterhorn_pytorch as mth
from conftest import run_model_in_cpp
from samples import CONV_SAMPLES, DEVICES, LINEAR_SAMPLES, opcheck, sum_error

ROOT = Path(__file__).resolve().parent.parent
ops = torch.ops.matterhorn
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SPIKE_OP = {ops.conv.default: ops.spike_conv.default, ops.conv_transpose.default: ops.spike_conv_transpose.default,
            ops.linear.default: ops.spike_linear.default}


def spikes(*shape, dtype=torch.float32, device="cpu", p=0.3):
    return (torch.rand(*shape, device=device) < p).to(dtype)


def reference_bits(x):
    """pack_spikes' format in plain torch: value k in memory order is bit k % 8 of byte k / 8."""
    flat = x.permute(*sorted(range(x.dim()), key=lambda d: -x.stride(d))).flatten() if x.dim() else x.flatten()
    ones = torch.nn.functional.pad((flat == 1).to(torch.int64), (0, -flat.numel() % 8))
    return (ones.view(-1, 8) << torch.arange(8, device=x.device)).sum(1).to(torch.uint8)


def saved(step):
    """The tensors `step` saves for backward (saved-tensor hooks) as (storage address, bytes), and
    its output."""
    tensors = []

    def pack(t):
        tensors.append((t.untyped_storage().data_ptr(), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return tensors, out


def input_bytes_kept(spiking, dense, x):
    """(bytes the spike layer keeps for its input, bytes the dense layer keeps of its input): the
    dense layer's saved tensors that share the input's storage, and what the spike layer saves
    beyond the dense layer's other tensors (weights, a standardised weight and its statistics)."""
    x_spiking, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    kept_spiking, y = saved(lambda: spiking(x_spiking))
    kept_dense, y_dense = saved(lambda: dense(x_dense))
    address = x_dense.untyped_storage().data_ptr()
    dense_input = sum(size for at, size in kept_dense if at == address)
    dense_other = sum(size for at, size in kept_dense if at != address)
    return sum(size for _, size in kept_spiking) - dense_other, dense_input, (x_spiking, y), (x_dense, y_dense)


# ---- pack_spikes / unpack_spikes ----------------------------------------------------------------

LAYOUTS = {  # a 0/1 tensor of the given numel in several layouts
    "contiguous": lambda n, dtype: spikes(n, dtype=dtype),
    "permuted": lambda n, dtype: spikes(3, 5, n, dtype=dtype).permute(2, 0, 1),
    "channels_last": lambda n, dtype: spikes(2, 3, 4, n, dtype=dtype).to(memory_format=torch.channels_last),
    "sliced": lambda n, dtype: spikes(2 * n + 1, dtype=dtype)[1::2],
    "offset": lambda n, dtype: spikes(n + 1, dtype=dtype)[1:],
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 63, 64, 65, 1000, 4099])
def test_pack_matches_the_bit_layout_and_unpack_restores_the_tensor(n, layout, dtype):
    x = LAYOUTS[layout](n, dtype)
    bits, invalid = ops.pack_spikes(x)
    packed_as = x.contiguous() if layout == "sliced" else x  # the tensor whose memory order the bits follow
    assert bits.dtype == torch.uint8 and bits.shape == (math.ceil(x.numel() / 8),)
    assert torch.equal(bits, reference_bits(packed_as)) and int(invalid) == 0
    y = ops.unpack_spikes(bits, invalid, list(x.shape), list(packed_as.stride()), dtype)
    assert torch.equal(y, x) and y.stride() == packed_as.stride()


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan"), float("inf"), 1e-30])
@pytest.mark.parametrize("position", [0, 200, 1030])  # a vector body and the scalar tail
def test_pack_rejects_anything_but_zero_and_one(value, position):
    x = spikes(1031)
    x[position] = value
    with pytest.raises(ValueError, match="Conv2d: spike_input=True expects an input of spikes, only 0 and 1"):
        ops.pack_spikes(x, "Conv2d")


def test_negative_zero_is_a_zero():
    x = torch.tensor([-0.0, 1.0, 0.0] * 30)
    bits, _ = ops.pack_spikes(x)
    assert torch.equal(ops.unpack_spikes(bits, None, [90], [1], torch.float32), x.abs())


def test_unpack_checks_its_arguments():
    bits, invalid = ops.pack_spikes(spikes(16))
    with pytest.raises(ValueError, match=r"expects bits of shape \[3\] for size \[17\], got \[2\]"):
        ops.unpack_spikes(bits, None, [17], [1], torch.float32)
    with pytest.raises(ValueError, match="non-overlapping dense stride"):
        ops.unpack_spikes(bits, None, [4, 4], [1, 1], torch.float32)
    with pytest.raises(TypeError, match="floating-point"):
        ops.unpack_spikes(bits, None, [16], [1], torch.int32)
    with pytest.raises(TypeError, match="uint8 bits"):
        ops.unpack_spikes(bits.float(), None, [16], [1], torch.float32)
    with pytest.raises(ValueError, match="Linear: spike_input=True expects"):  # the flag a CUDA pack sets
        ops.unpack_spikes(bits, torch.ones((), dtype=torch.uint8), [16], [1], torch.float32, "Linear")
    with pytest.raises(TypeError, match="floating-point input"):
        ops.pack_spikes(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pack_and_unpack(device):
    for x in [spikes(3, 5, 7, device=device), spikes(4, 3, 6, 6, device=device).to(memory_format=torch.channels_last),
              spikes(64, dtype=torch.bfloat16, device=device), spikes(0, 4, device=device)]:
        opcheck(ops.pack_spikes.default, (x,))
        bits, invalid = ops.pack_spikes(x)
        opcheck(ops.unpack_spikes.default, (bits, invalid, list(x.shape), list(x.stride()), x.dtype))
        opcheck(ops.unpack_spikes.default, (bits, None, list(x.shape), list(x.stride()), torch.float64), aot=False)


# ---- the spike ops against torch.nn -------------------------------------------------------------

def gradients(function, tensors, grad):
    out = function(*tensors)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, wanted, grad)


def check_against_reference(op, args, reference):
    """The spike op's output equals the dense one bit for bit; its gradients equal torch.nn's on the
    folded tensor within the sum bound (S and K from the reference run on |x|, |w|, |g| and on ones)."""
    x, weight, bias, *rest = args
    dense_out = op(*args)
    grad = torch.randn_like(dense_out)
    out, got = gradients(lambda *t: SPIKE_OP[op](*t, *rest), (x, weight, bias), grad)
    assert torch.equal(out, dense_out)
    _, expected = gradients(reference, (x, weight, bias), grad)

    def like(t, fill):
        return None if t is None else fill(t.detach()).requires_grad_(t.requires_grad)

    _, magnitudes = gradients(reference, [like(t, torch.abs) for t in (x, weight, bias)], grad.abs())
    _, counts = gradients(reference, [like(t, torch.ones_like) for t in (x, weight, bias)], torch.ones_like(grad))
    for g, e, s, k in zip(got, expected, magnitudes, counts):
        bound = k.max().item() * torch.finfo(g.dtype).eps * s.double()
        assert ((g.double() - e.double()).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", [s for s in CONV_SAMPLES if s.requires_grad], ids=lambda s: s.id)
def test_conv_gradients_equal_torch_nn(sample, device):
    op, args = sample.op_args(device)
    x = spikes(*args[0].shape, dtype=args[0].dtype, device=device).requires_grad_()
    check_against_reference(op, (x, *args[1:]), sample.torch_reference)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", [s for s in LINEAR_SAMPLES if s.grad], ids=lambda s: s.id)
def test_linear_gradients_equal_torch_nn(sample, device):
    op, (x, weight, bias) = sample.op_args(device)
    x = spikes(*x.shape, dtype=x.dtype, device=device).requires_grad_("x" in sample.grad)
    check_against_reference(op, (x, weight, bias), sample.torch_reference)


# through AOTAutograd (seconds each): a padding mode with asymmetric padding, a transposed conv with output_size
AOT_CONV = [s for s in CONV_SAMPLES if s.aot and (s.padding or s.output_size)]


@pytest.mark.parametrize("sample", [s for s in CONV_SAMPLES if s.gradcheck] + AOT_CONV, ids=lambda s: s.id)
def test_opcheck_spike_conv(sample):
    op, args = sample.op_args()
    x = spikes(*args[0].shape, dtype=args[0].dtype).requires_grad_(sample.requires_grad)
    opcheck(SPIKE_OP[op], (x, *args[1:]), aot=sample in AOT_CONV)


@pytest.mark.parametrize("sample", [s for s in LINEAR_SAMPLES if s.aot], ids=lambda s: s.id)
def test_opcheck_spike_linear(sample):
    op, (x, weight, bias) = sample.op_args()
    opcheck(SPIKE_OP[op], (spikes(*x.shape, dtype=x.dtype).requires_grad_("x" in sample.grad), weight, bias))


# ---- the layers ---------------------------------------------------------------------------------

LAYERS = {  # name: (constructor arguments, one step's input shape without B)
    "Linear": ((24, 5), (3, 24)),
    "Conv1d": ((4, 3, 3), (4, 16)),
    "Conv2d": ((4, 3, 3), (4, 8, 8)),
    "Conv3d": ((4, 3, 3), (4, 4, 4, 4)),
    "ConvTranspose1d": ((4, 3, 3), (4, 16)),
    "ConvTranspose2d": ((4, 3, 3), (4, 8, 8)),
    "ConvTranspose3d": ((4, 3, 3), (4, 4, 4, 4)),
    "WSLinear": ((24, 5), (3, 24)),
    "WSConv2d": ((4, 3, 3), (4, 8, 8)),
}
MODES = {"multi-step": dict(multi_time_step=True), "batch_first": dict(multi_time_step=True, batch_first=True),
         "single-step": dict(multi_time_step=False)}


def layer_pair(name, dtype=torch.float32, **mode):
    """The layer with spike_input=True and its dense twin, with the same parameters."""
    arguments, _ = LAYERS[name]
    cls = getattr(mth.snn, name)
    spiking, dense = cls(*arguments, dtype=dtype, spike_input=True, **mode), cls(*arguments, dtype=dtype, **mode)
    dense.load_state_dict(spiking.state_dict())
    return spiking, dense


def layer_input(name, mode, dtype=torch.float32, T=4, B=2):
    step = LAYERS[name][1]
    leading = {"multi-step": (T, B), "batch_first": (B, T), "single-step": (B,)}[mode]
    return spikes(*leading, *step, dtype=dtype)


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 32), (torch.bfloat16, 16)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LAYERS)
def test_layer_keeps_its_input_as_bits_with_the_dense_gradients(name, mode, dtype, factor):
    spiking, dense = layer_pair(name, dtype, **MODES[mode])
    x = layer_input(name, mode, dtype)
    kept, kept_dense, (x_spiking, y), (x_dense, y_dense) = input_bytes_kept(spiking, dense, x)
    assert kept * factor <= x.numel() * x.element_size() <= kept_dense  # the bits, against the dense input
    assert torch.equal(y, y_dense)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_dense.backward(grad)
    assert torch.equal(x_spiking.grad, x_dense.grad)
    for (key, p), q in zip(spiking.named_parameters(), dense.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), key


@pytest.mark.parametrize("name", ["Linear", "Conv2d", "ConvTranspose1d"])
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan")])
def test_layer_rejects_a_non_spike_input(name, value):
    spiking, _ = layer_pair(name)
    x = layer_input(name, "multi-step")
    x.view(-1)[x.numel() // 2] = value
    with pytest.raises(ValueError, match=f"{name.replace('WS', '')}: spike_input=True expects an input of spikes"):
        spiking(x)


def test_only_the_weight_gradient_unpacks_the_input():
    spiking, _ = layer_pair("Conv2d")
    spiking.requires_grad_(False)
    x = layer_input("Conv2d", "multi-step").requires_grad_()
    y = spiking(x)
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with profile:
        y.sum().backward()
    names = {event.name for event in profile.events()}
    assert "matterhorn::unpack_spikes" not in names and x.grad is not None
    spiking.weight.requires_grad_(True)
    with profile:
        spiking(x).sum().backward()
    assert "matterhorn::unpack_spikes" in {event.name for event in profile.events()}


def test_no_graph_no_bits():
    spiking, dense = layer_pair("Conv2d")
    x = layer_input("Conv2d", "multi-step")
    with torch.no_grad():
        assert torch.equal(spiking(x), dense(x))
        assert spiking(x).grad_fn is None


def test_double_backward_refuses_and_forward_mode_ad_runs_the_dense_path():
    spiking, dense = layer_pair("Conv1d")
    x = layer_input("Conv1d", "multi-step").requires_grad_()
    with pytest.raises(RuntimeError, match="Conv1d with spike_input=True: double backward"):
        torch.autograd.grad(spiking(x).square().sum(), spiking.weight, create_graph=True)
    tangent = torch.randn_like(x)
    out, jvp = torch.func.jvp(lambda t: spiking(t), (x.detach(),), (tangent,))
    dense_out, dense_jvp = torch.func.jvp(lambda t: dense(t), (x.detach(),), (tangent,))
    assert torch.equal(out, dense_out) and torch.equal(jvp, dense_jvp)


def test_autocast_computes_in_bfloat16_and_keeps_bits():
    spiking, dense = layer_pair("Conv2d")
    x = layer_input("Conv2d", "multi-step")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, y = saved(lambda: spiking(x.clone().requires_grad_()))
        kept_dense, y_dense = saved(lambda: dense(x.clone().requires_grad_()))
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_dense)
    # both keep the weight cast to bfloat16; the dense layer the input cast to bfloat16 as well, ours its bits
    cast_input = x.numel() * 2
    assert sum(size for _, size in kept) == sum(size for _, size in kept_dense) - cast_input + cast_input // 16


def test_constructor_argument_is_a_keyword_only_bool():
    import inspect

    for name in LAYERS:
        parameter = inspect.signature(getattr(mth.snn, name)).parameters["spike_input"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is False
    with pytest.raises(TypeError, match="Conv2d: spike_input must be a bool"):
        mth.snn.Conv2d(2, 2, 3, spike_input=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA GPU (scripts/gpu_check.sh runs it there)")
@pytest.mark.parametrize("name", ["Linear", "Conv2d", "ConvTranspose3d"])
def test_cuda_forward_does_not_synchronise_and_backward_rejects_a_non_spike_input(name):
    spiking, dense = (layer.cuda() for layer in layer_pair(name))
    x = layer_input(name, "multi-step").cuda()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the forward raises
    try:
        kept, _, (x_spiking, y), (x_dense, y_dense) = input_bytes_kept(spiking, dense, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert kept * 32 <= x.numel() * 4 + 32  # the bits and the one-byte flag
    grad = torch.randn_like(y)
    y.backward(grad)
    y_dense.backward(grad)
    assert torch.equal(y, y_dense) and torch.equal(x_spiking.grad, x_dense.grad)
    for p, q in zip(spiking.parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # cuDNN may pick another algorithm for either
    x.view(-1)[x.numel() // 3] = 2
    y = spiking(x.requires_grad_())  # the forward neither raises nor synchronises
    with pytest.raises(ValueError, match=f"{name}: spike_input=True expects an input of spikes"):
        y.sum().backward()


@pytest.mark.parametrize("name", ["Linear", "Conv2d", "ConvTranspose1d"])
def test_cpp_modules_take_the_option(name):
    """matterhorn::snn's LinearOptions / ConvOptions / ConvTransposeOptions .spike_input(true): the
    C++ module computes what the Python layer does and records the spike op (its parameters require
    gradients), which rejects a non-spike input."""
    from torch.utils.dlpack import from_dlpack, to_dlpack

    spiking, _ = layer_pair(name)
    arguments = LAYERS[name][0]
    cpp = getattr(mth._C, name)(*arguments[:2], *([[arguments[2]]] if len(arguments) > 2 else []), spike_input=True)
    cpp.load_parameters({key: to_dlpack(p.detach()) for key, p in spiking.named_parameters()})
    assert "spike_input=true" in repr(cpp)
    x = layer_input(name, "multi-step")
    torch.testing.assert_close(from_dlpack(cpp.forward(to_dlpack(x))), spiking(x), rtol=0, atol=0)
    x.view(-1)[3] = 0.5
    with pytest.raises(ValueError, match=f"{name}: spike_input=True expects"):
        cpp.forward(to_dlpack(x))


# ---- TorchScript, compile, export ---------------------------------------------------------------

def spiking_network():
    return torch.nn.Sequential(mth.snn.Conv2d(2, 4, 3, padding=1, spike_input=True), torch.nn.Flatten(2),
                               torch.nn.ReLU(), mth.snn.Linear(4 * 36, 3, spike_input=False))


def test_torchscript_compile_and_export_keep_the_spike_op(tmp_path):
    torch.manual_seed(0)
    model = spiking_network()
    x = spikes(3, 2, 2, 6, 6)
    expected = model(x)
    scripted = torch.jit.script(model)
    scripted.save(str(tmp_path / "model.pt"))
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    assert torch.equal(loaded(x), expected) and "matterhorn::spike_conv" in str(loaded.inlined_graph)
    torch.testing.assert_close(run_model_in_cpp(tmp_path / "model.pt", x, tmp_path), expected)  # C++, no Python
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled_model = spiking_network()
    compiled_model.load_state_dict(model.state_dict())
    # AOTAutograd traces our node's forward and backward on fake tensors; inductor would only add its
    # own code generation around the ops (seconds, nothing of ours)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend="aot_eager")
    y = compiled(x_compiled)
    torch.testing.assert_close(y, model(x_eager))
    y.square().sum().backward()
    model(x_eager).square().sum().backward()
    terms = sum_error(3 * 2 * 36)  # the longest sum: the conv weight's, over T*B*H*W positions
    for p, q in zip(compiled_model.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=terms, atol=terms * q.grad.abs().max())
    T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: T, 1: B},))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "matterhorn.spike_conv.default" in targets
    x2 = spikes(5, 3, 2, 6, 6)
    torch.testing.assert_close(exported.module()(x2), model(x2))


# ---- the CUDA kernels, on the CPU ----------------------------------------------------------------

@pytest.fixture(scope="module")
def emulated():
    build = ROOT / "build" / "emulation_spike"
    build.mkdir(parents=True, exist_ok=True)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    library = Path(mth._C.__file__).resolve().parent / "lib"
    torch.utils.cpp_extension.load(
        name="matterhorn_spike_emulated",
        sources=[str(ROOT / "tests" / "emulation" / "spike_pack_on_cpu.cpp")],
        extra_include_paths=[str(ROOT / "cpp" / "src"), str(ROOT / "cpp" / "include"), str(ROOT / "tests" / "emulation")],
        extra_cflags=["-std=c++20", "-O1"],
        extra_ldflags=[f"-L{library}", "-lmatterhorn", f"-Wl,-rpath,{library}"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.matterhorn_spike_emulated


def fenced(n, dtype, misaligned):
    """Spikes between NaN margins (a read past either end is a non-spike value: the flag rises),
    starting one element off a 16-byte boundary if misaligned."""
    margin = 64 + (1 if misaligned else 0)
    buffer = torch.full((n + 2 * margin,), float("nan"), dtype=dtype)
    buffer[margin:margin + n] = spikes(n, dtype=dtype)
    return buffer[margin:margin + n]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100, 8192 + 40])  # one thread, whole words, a partial last word
def test_cuda_kernels_match_the_cpu_ones(emulated, n, misaligned, dtype):
    x = fenced(n, dtype, misaligned)
    bits, invalid = emulated.pack_spikes(x)
    assert torch.equal(bits, ops.pack_spikes(x)[0]) and int(invalid) == 0
    assert torch.equal(emulated.unpack_spikes(bits, invalid, [n], [1], dtype), x)
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), bits])[1:]  # bits one byte off: byte loads
    assert torch.equal(emulated.unpack_spikes(shifted, invalid, [n], [1], dtype), x)
    x[n // 2] = 2
    bits, invalid = emulated.pack_spikes(x)
    assert int(invalid) == 1  # only the flag: no host synchronisation in forward
    with pytest.raises(ValueError, match="unpack_spikes: spike_input=True expects"):
        emulated.unpack_spikes(bits, invalid, [n], [1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_move_each_value_once_in_16_byte_vectors(emulated, dtype):
    x = spikes(4, 2, 64, 64, dtype=dtype)
    emulated.take_traffic()
    bits, invalid = emulated.pack_spikes(x)
    assert emulated.take_traffic() == [x.numel() * x.element_size(), bits.numel()]
    emulated.unpack_spikes(bits, invalid, list(x.shape), list(x.stride()), dtype)
    assert emulated.take_traffic() == [bits.numel(), x.numel() * x.element_size()]


def test_unpack_spikes_argument_errors_say_what_is_wrong():
    with pytest.raises(TypeError, match="`invalid` as a uint8 scalar, got torch.float32"):
        torch.ops.matterhorn.unpack_spikes(torch.zeros(1, dtype=torch.uint8), torch.zeros(()), [3], [1], torch.float32)
    with pytest.raises(ValueError, match="overflows int64"):
        torch.ops.matterhorn.unpack_spikes(torch.zeros(0, dtype=torch.uint8), None, [2**62, 4], [4, 1], torch.float32)
