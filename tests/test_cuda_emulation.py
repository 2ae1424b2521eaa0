"""BatchNorm's CUDA kernels and launch sequences, run on the CPU (tests/emulation): the very source
that nvcc compiles, with each block's threads played as fibers. Inputs lie between NaN margins
(a read past either end poisons the result), fresh memory is NaN (an unwritten output element
fails) and allocations are fenced (a write past either end is counted). Compared against float64
references. What this cannot show, a GPU run shows: tests/test_cuda.py, scripts/gpu_check.sh."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

import matterhorn_pytorch as mth
from samples import assert_within, sum_error

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_DIR = Path(mth._C.__file__).resolve().parent / "lib"


@pytest.fixture(scope="module")
def emulated():
    build = ROOT / "build" / "emulation"
    build.mkdir(parents=True, exist_ok=True)
    # ninja from the environment's own bin (pip's ninja), whether or not it is activated
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    torch.utils.cpp_extension.load(
        name="matterhorn_emulated",
        sources=[str(ROOT / "tests" / "emulation" / "batch_norm_on_cpu.cpp")],
        extra_include_paths=[str(ROOT / "cpp" / "src"), str(ROOT / "cpp" / "include"), str(ROOT / "tests" / "emulation")],
        extra_cflags=["-std=c++20", "-O1"],
        extra_ldflags=[f"-L{LIBRARY_DIR}", "-lmatterhorn", f"-Wl,-rpath,{LIBRARY_DIR}"],
        build_directory=str(build),
        is_python_module=False,
    )
    ops = torch.ops.matterhorn_emulated
    yield ops
    assert ops.overruns() == 0, "a kernel wrote past the end of an allocation"


# float64: a few float64 operations per element on the kernel's own statistics, 64 units for headroom
TOLERANCE = {torch.float64: dict(rtol=64 * 2.0**-52, atol=64 * 2.0**-52), torch.float32: dict(rtol=1e-5, atol=1e-5),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def fenced(shape, dtype, channels_last=False, misaligned=False):
    """Normal values in a tensor whose storage has NaN on both sides (and, if misaligned, starts
    one element off a 16-byte boundary)."""
    stored = (shape[0], *shape[2:], shape[1]) if channels_last else shape
    n, margin = math.prod(shape), 64 + (1 if misaligned else 0)
    buffer = torch.full((n + 2 * margin,), float("nan"), dtype=dtype)
    buffer[margin:margin + n] = torch.randn(n, dtype=torch.float64).to(dtype)
    x = buffer[margin:margin + n].view(stored)
    return x.movedim(-1, 1) if channels_last else x


def per_group(t, groups):
    """[N, C, ...] -> float64 [G, C, values]."""
    n, c = t.shape[:2]
    return t.double().reshape(groups, n // groups, c, -1).transpose(1, 2).reshape(groups, c, -1)


CASES = [  # folded shape [N, C, ...], groups, channels_last, misaligned
    ((6, 5, 7, 3), 1, False, False),
    ((6, 5, 7, 3), 2, False, False),
    ((6, 5, 7, 3), 3, True, False),
    ((8, 3, 16), 1, False, False),
    ((8, 3, 16), 4, False, True),
    ((4, 8, 16, 16), 1, False, False),
    ((4, 8, 16, 16), 2, True, False),
    ((10, 1, 9), 1, False, False),
    ((10, 1), 1, False, False),
    ((3, 7), 3, False, False),  # one row per group: grad_weight's [G, C] call of the element op
    ((3, 300, 4), 1, True, False),
    ((3, 300, 4), 3, False, False),
    ((12, 1030), 2, False, False),
    ((16, 1024), 1, False, False),
    ((16, 1024), 1, False, True),
    ((2, 16, 2, 2, 2), 1, True, False),
    ((2, 2, 128, 128), 1, False, False),  # rows and a row's vectors both split over blocks
    ((1, 3, 64, 96), 1, False, False),  # T*B = 1
]


@pytest.mark.parametrize("multiprocessors", [1, 132])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape,groups,channels_last,misaligned", CASES)
def test_kernels_match_float64(emulated, shape, groups, channels_last, misaligned, dtype, multiprocessors):
    if channels_last and len(shape) < 3:
        pytest.skip("no spatial size")
    x = fenced(shape, dtype, channels_last, misaligned)
    dy = fenced(shape, dtype, channels_last)
    channels = shape[1]
    weight = torch.rand(channels, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, dtype=torch.float64)
    param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    w, b = weight.to(param_dtype), bias.to(param_dtype)
    eps = 1e-5

    mean, var = emulated.batch_norm_stats(x, groups, multiprocessors)
    xs = per_group(x, groups)
    n = xs.shape[-1]
    if dtype == torch.float64:  # float64 accumulation: n roundings of float64 at most
        assert_within(mean, xs.mean(-1), sum_error(n, torch.float64) * xs.abs().mean(-1))
        assert_within(var, xs.var(-1, unbiased=False), sum_error(n, torch.float64) * xs.square().mean(-1))
    else:
        torch.testing.assert_close(mean.double(), xs.mean(-1), **TOLERANCE[torch.float32])
        torch.testing.assert_close(var.double(), xs.var(-1, unbiased=False), **TOLERANCE[torch.float32])

    y = emulated.batch_norm_elemt(x, mean, var, w, b, eps, groups, multiprocessors)
    assert y.dtype == dtype and y.shape == x.shape
    invstd = (var.double() + eps).rsqrt()
    expected = (xs - mean.double()[..., None]) * invstd[..., None] * weight[:, None] + bias[:, None]
    torch.testing.assert_close(per_group(y, groups), expected, **TOLERANCE[dtype])

    sum_dy, sum_dy_xmu = emulated.batch_norm_backward_reduce(dy, x, mean, groups, multiprocessors)
    dys = per_group(dy, groups)
    terms = dys * (xs - mean.double()[..., None])
    if dtype == torch.float64:
        assert_within(sum_dy, dys.sum(-1), sum_error(n, torch.float64) * dys.abs().sum(-1))
        assert_within(sum_dy_xmu, terms.sum(-1), sum_error(n, torch.float64) * terms.abs().sum(-1))
    else:
        torch.testing.assert_close(sum_dy.double(), dys.sum(-1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sum_dy_xmu.double(), terms.sum(-1), rtol=1e-4, atol=1e-4)

    count = xs.shape[-1]
    dx = emulated.batch_norm_backward_elemt(dy, x, mean, var, w, sum_dy, sum_dy_xmu, eps, count, groups, multiprocessors)
    expected = ((dys - sum_dy.double()[..., None] / count
                 - (xs - mean.double()[..., None]) * invstd[..., None] ** 2 * sum_dy_xmu.double()[..., None] / count)
                * invstd[..., None] * weight[:, None])
    torch.testing.assert_close(per_group(dx, groups), expected, **TOLERANCE[dtype])


def test_without_weight_and_bias(emulated):
    x = fenced((5, 4, 6), torch.float32)
    mean, var = emulated.batch_norm_stats(x, 1, 1)
    y = emulated.batch_norm_elemt(x, mean, var, None, None, 1e-3, 1, 1)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_match_the_cpu_kernel(emulated, momentum, dtype):
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the statistics' accumulation type
    mean, var = torch.randn(3, 7, dtype=stat_dtype).abs(), torch.rand(3, 7, dtype=stat_dtype) + 0.1
    state = [torch.randn(7, dtype=dtype), torch.rand(7, dtype=dtype) + 0.5, torch.tensor(4)]
    ours = [t.clone() for t in state]
    emulated.batch_norm_update_stats(mean, var, 20, *ours, momentum)
    torch.ops.matterhorn.batch_norm_update_stats(mean, var, 20, *state, momentum)
    for a, b in zip(ours, state):
        torch.testing.assert_close(a, b)
    assert int(ours[2]) == 7


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("statistics", ["per-group", "shared"])
@pytest.mark.parametrize("parameters", ["per-channel", "per-group"])
@pytest.mark.parametrize("scaled", [False, True], ids=["no-scale", "scale"])
def test_per_group_values_and_scale_match_the_cpu_kernels(emulated, channels_last, statistics, parameters, scaled):
    """The temporal layers' element passes: statistics [G, C] or shared [1, C], weight and bias [C]
    or [G, C], a scale [G] (TEBN), in 16-byte vectors (C = 8) and single values (misaligned)."""
    G, C = 3, 8
    x = fenced((6, C, 4, 4), torch.float32, channels_last)
    dy = fenced((6, C, 4, 4), torch.float32, channels_last)
    rows = G if statistics == "per-group" else 1
    mean, var = torch.randn(rows, C), torch.rand(rows, C) + 0.5
    w, b = (torch.randn(G, C), torch.randn(G, C)) if parameters == "per-group" else (torch.randn(C), torch.randn(C))
    scale = torch.rand(G) + 0.5 if scaled else None
    cpu = torch.ops.matterhorn
    torch.testing.assert_close(emulated.batch_norm_elemt(x, mean, var, w, b, 1e-5, G, 4, scale),
                               cpu.batch_norm_elemt(x, mean, var, w, b, 1e-5, G, scale), **TOLERANCE[torch.float32])
    sums = emulated.batch_norm_backward_reduce(dy, x, mean, G, 4)
    for a, b_ in zip(sums, cpu.batch_norm_backward_reduce(dy, x, mean, G)):
        torch.testing.assert_close(a, b_, **TOLERANCE[torch.float32])
    sum_dy, sum_dy_xmu = (t[:rows] for t in sums)
    count = 6 * 16 // rows
    if parameters == "per-group" and statistics == "shared":  # dx's sums would run over changing weights
        for op in (lambda: emulated.batch_norm_backward_elemt(dy, x, mean, var, w, sum_dy, sum_dy_xmu, 1e-5, count,
                                                              G, 4, scale),
                   lambda: cpu.batch_norm_backward_elemt(dy, x, mean, var, w, sum_dy, sum_dy_xmu, 1e-5, count, G,
                                                         scale)):
            with pytest.raises(ValueError, match="a weight per group needs statistics per group"):
                op()
        return
    torch.testing.assert_close(
        emulated.batch_norm_backward_elemt(dy, x, mean, var, w, sum_dy, sum_dy_xmu, 1e-5, count, G, 4, scale),
        cpu.batch_norm_backward_elemt(dy, x, mean, var, w, sum_dy, sum_dy_xmu, 1e-5, count, G, scale),
        **TOLERANCE[torch.float32])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_per_group_rows_match_the_cpu_kernel(emulated, momentum):
    mean, var = torch.randn(3, 7), torch.rand(3, 7) + 0.1
    state = [torch.randn(3, 7), torch.rand(3, 7) + 0.5, torch.tensor(4)]
    ours = [t.clone() for t in state]
    emulated.batch_norm_update_stats(mean, var, 20, *ours, momentum)
    torch.ops.matterhorn.batch_norm_update_stats(mean, var, 20, *state, momentum)
    for a, b in zip(ours, state):
        torch.testing.assert_close(a, b)
    assert int(ours[2]) == 5  # one batch counted for [G, C] rows


def test_the_grid_fills_the_card_on_the_anchor_cases(emulated):
    """The plans for bench/bench_gpu.py's 1 GiB BatchNorm case on an H200 (132 SMs): several waves of blocks, each
    thread streaming many 16-byte vectors, grid dimensions within the hardware's limits."""
    for shape, channels_last in [((256, 64, 128, 128), False), ((256, 64, 128, 128), True), ((256, 128, 32, 32), False)]:
        x = torch.empty(shape, device="meta")
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        grid_x, grid_y, grid_z, lanes, splits = emulated.tiling(x, 1, 4, 132)
        blocks = grid_x * grid_y * grid_z
        assert blocks >= 132 * 8, (shape, blocks)
        assert x.numel() / 4 / (blocks * 256) >= 4, (shape, blocks)
        assert grid_y <= 65535 and grid_z <= 65535


def test_huge_row_counts_stay_within_the_grid(emulated):
    x = torch.empty(1 << 26, 4, 2, 2, device="meta").to(memory_format=torch.channels_last)
    grid_x, grid_y, grid_z, lanes, splits = emulated.tiling(x, 1, 4, 100000)
    assert grid_y <= 65535 and splits == grid_y
    x = torch.empty(1 << 20, 3, 4, 4, device="meta")
    assert emulated.tiling(x, 1, 4, 100000)[1] <= 65535


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last,misaligned", [(False, False), (True, False), (False, True)])
def test_a_training_step_moves_the_tensor_eight_times_in_16_byte_vectors(emulated, channels_last, misaligned, dtype):
    """The 8-pass floor of a BatchNorm training step, by design: statistics read x; normalize reads x, writes y;
    the backward reduction reads dy and x; the input gradient reads dy and x, writes dx. Each
    access is one 16-byte vector, unless the input's start is not 16-byte aligned."""
    shape = (4, 8, 16, 16)
    x, dy = fenced(shape, dtype, channels_last, misaligned), fenced(shape, dtype, channels_last)
    emulated.take_traffic()
    mean, var = emulated.batch_norm_stats(x, 1, 4)
    emulated.batch_norm_elemt(x, mean, var, None, None, 1e-5, 1, 4)
    sum_dy, sum_dy_xmu = emulated.batch_norm_backward_reduce(dy, x, mean, 1, 4)
    emulated.batch_norm_backward_elemt(dy, x, mean, var, None, sum_dy, sum_dy_xmu, 1e-5, 4 * 16 * 16, 1, 4)
    loaded, stored, loads, stores = emulated.take_traffic()
    tensor_bytes = x.numel() * x.element_size()
    assert (loaded, stored) == (6 * tensor_bytes, 2 * tensor_bytes)
    access_bytes = x.element_size() if misaligned else 16
    assert (loaded, stored) == (access_bytes * loads, access_bytes * stores)


def traced(emulated, op, *args):
    """op(*args) and the addresses of its kernels' loads, in the order they ran."""
    emulated.take_load_addresses()
    emulated.trace_loads()
    result = op(*args)
    return result, emulated.take_load_addresses()


def first_quarter(addresses):
    return set(addresses[:len(addresses) // 4])


def last_quarter(addresses):
    return set(addresses[-(len(addresses) // 4):])


@pytest.mark.parametrize("channels_last", [False, True])
def test_each_pass_starts_on_what_the_pass_before_it_read_last(emulated, channels_last):
    """Reductions walk the grid backwards and element passes forwards, so that the first loads of a
    pass hit data the previous pass left in L2 (blocks run in blockIdx order here, roughly so on
    the GPU): the first quarter of an element pass's loads is among the last quarter of the
    reduction's before it, and a reduction starts in the second half of its input (which its
    producer, walking forwards, wrote last)."""
    shape, count = (16, 8, 32, 32), 16 * 32 * 32
    x, dy = fenced(shape, torch.float32, channels_last), fenced(shape, torch.float32, channels_last)
    assert math.prod(emulated.tiling(x, 1, 4, 132)[:3]) >= 16  # a grid of many blocks
    (mean, var), statistics = traced(emulated, emulated.batch_norm_stats, x, 1, 132)
    _, normalize = traced(emulated, emulated.batch_norm_elemt, x, mean, var, None, None, 1e-5, 1, 132)
    sums, reduction = traced(emulated, emulated.batch_norm_backward_reduce, dy, x, mean, 1, 132)
    _, input_gradient = traced(emulated, emulated.batch_norm_backward_elemt, dy, x, mean, var, None, *sums, 1e-5,
                               count, 1, 132)
    assert first_quarter(normalize) <= last_quarter(statistics)
    assert first_quarter(input_gradient) <= last_quarter(reduction)
    half = x.numel() * x.element_size() // 2
    assert min(first_quarter(statistics)) >= x.data_ptr() + half


@pytest.mark.parametrize("multiprocessors", [1, 132])
def test_statistics_above_two_to_the_24_values_per_channel(emulated, multiprocessors):
    """Counts are integers and partial moments merge with Chan's formula: exact at any count (a
    float count stops growing at 2^24)."""
    x = (torch.randn(1 << 23, 1, 3, dtype=torch.float64) * 3 + 5).float()  # 2^24 * 1.5 values
    mean, var = emulated.batch_norm_stats(x, 1, multiprocessors)
    torch.testing.assert_close(mean.double(), x.double().mean().view(1, 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x.double().var(unbiased=False).view(1, 1), rtol=1e-5, atol=0)


def test_empty_inputs_and_bad_arguments_as_on_the_cpu(emulated):
    """The launch sequences run the building blocks' shared checks and handle zero sizes."""
    x = torch.randn(4, 3, 0)
    mean, var = emulated.batch_norm_stats(x, 1, 4)
    assert mean.isnan().all() and var.isnan().all()
    zeros, ones = torch.zeros(1, 3), torch.ones(1, 3)
    assert emulated.batch_norm_elemt(x, zeros, ones, None, None, 1e-5, 1, 4).shape == x.shape
    sum_dy, sum_dy_xmu = emulated.batch_norm_backward_reduce(x, x, zeros, 1, 4)
    assert not sum_dy.any() and not sum_dy_xmu.any()
    assert emulated.batch_norm_backward_elemt(x, x, zeros, ones, None, zeros, zeros, 1e-5, 0, 1, 4).shape == x.shape
    with pytest.raises(ValueError, match="grad_output must have the input's shape"):
        emulated.batch_norm_backward_reduce(torch.randn(1, 3), torch.randn(1000, 3), zeros, 1, 4)
    with pytest.raises(ValueError, match="mean must hold"):
        emulated.batch_norm_elemt(torch.randn(4, 3), torch.zeros(1, 2), ones, None, None, 1e-5, 1, 4)
    state = [torch.zeros(3), torch.ones(3), torch.tensor(5)]
    emulated.batch_norm_update_stats(zeros, ones, 0, *state, 0.1)  # an empty batch is counted only
    assert int(state[2]) == 6 and not state[0].any() and (state[1] == 1).all()
