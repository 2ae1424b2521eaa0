"""Inputs that crash the process (SIGFPE, SIGSEGV) or give a silently wrong answer where a check
or an exact count is missing; each case's heading names what it guards against. Each case
checks torch.nn's answer or a clean error itself; tests/test_reliability.py runs them all in
one child process (`python reliability_cases.py`), which prints one JSON line per case, so that a
crash fails the case it happened in instead of killing the test run."""

import json
import re
import sys

import torch
import torch.nn as nn

import matterhorn_pytorch as mth

CASES = {}


def case(function):
    CASES[function.__name__] = function
    return function


def raises(error, pattern, function, *args):
    try:
        function(*args)
    except error as caught:
        assert re.search(pattern, str(caught)), f"{type(caught).__name__} without /{pattern}/: {caught}"
        return
    raise AssertionError(f"expected {error.__name__} /{pattern}/, got a result")


def same_as_folded(layer, twin, x):
    """layer(x) equals twin on the folded [T*B, ...] tensor, as do their running statistics."""
    twin.load_state_dict(layer.state_dict())
    y = layer(x)
    expected = twin(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    torch.testing.assert_close(y, expected)
    for name, buffer in twin.named_buffers():
        torch.testing.assert_close(getattr(layer, name), buffer, msg=name)
    return y


# 1. zero spatial size in eval (SIGFPE)
@case
def batch_norm2d_eval_zero_spatial_size():
    same_as_folded(mth.snn.BatchNorm2d(3).eval(), nn.BatchNorm2d(3).eval(), torch.randn(2, 2, 3, 0, 4))


@case
def batch_norm1d_eval_zero_length():
    same_as_folded(mth.snn.BatchNorm1d(3).eval(), nn.BatchNorm1d(3).eval(), torch.randn(2, 2, 3, 0))


@case
def batch_norm2d_train_zero_spatial_size_counts_the_batch():
    same_as_folded(mth.snn.BatchNorm2d(3), nn.BatchNorm2d(3), torch.randn(2, 2, 3, 4, 0))


# 2. per-step statistics with T = 0 or B = 0 (SIGFPE)
@case
def batch_norm2d_per_step_zero_steps():
    for batch_first in (False, True):
        m = mth.snn.BatchNorm2d(3, per_step=True, batch_first=batch_first)
        assert m(torch.randn(0, 2, 3, 4, 4)).shape == (0, 2, 3, 4, 4)
        assert int(m.num_batches_tracked) == (2 if batch_first else 0)  # batch_first: 2 steps of an empty batch


@case
def batch_norm2d_per_step_empty_batch_counts_each_step():
    m, twin = mth.snn.BatchNorm2d(3, per_step=True), nn.BatchNorm2d(3)
    x = torch.randn(4, 0, 3, 2, 2)
    assert m(x).shape == x.shape
    for step in x:
        twin(step)
    torch.testing.assert_close(m.num_batches_tracked, twin.num_batches_tracked)
    torch.testing.assert_close(m.running_mean, twin.running_mean)


@case
def batch_norm2d_train_empty_batch_single_step():
    m, twin = mth.snn.BatchNorm2d(3).single_step_mode_(), nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y, expected = m(x), twin(x)
    assert y.shape == expected.shape and int(m.num_batches_tracked) == int(twin.num_batches_tracked) == 1
    y.sum().backward()
    assert x.grad.shape == x.shape and m.weight.grad is not None and not m.weight.grad.any()


# 3. running_mean without running_var (SIGSEGV)
@case
def batch_norm_running_var_none():
    m = mth.snn.BatchNorm2d(3)
    m.running_var = None
    raises(ValueError, "BatchNorm2d.*running_mean and running_var", m, torch.randn(2, 2, 3, 4, 4))
    raises(ValueError, "running_mean and running_var", torch.ops.matterhorn.batch_norm, torch.randn(4, 3, 2), None,
           None, torch.zeros(3), None, None, True, 0.1, 1e-5)


# 4. zero sizes in the public ops (SIGFPE)
@case
def batch_norm_op_zero_features():
    y = torch.ops.matterhorn.batch_norm(torch.randn(4, 0, 4, 4), None, None, None, None, None, True, 0.1, 1e-5)
    assert y.shape == (4, 0, 4, 4)
    raises(ValueError, "more than 1 value per channel", torch.ops.matterhorn.batch_norm,
           torch.randn(1, 0, 1, 1), None, None, None, None, None, True, 0.1, 1e-5)
    y = torch.ops.matterhorn.batch_norm_layer(
        torch.randn(2, 2, 0, 4, 4), None, None, None, None, None, True, 0.1, 1e-5, "BatchNorm2d", 0, True)
    assert y.shape == (2, 2, 0, 4, 4)


@case
def batch_norm_blocks_on_zero_size():
    ops = torch.ops.matterhorn
    x, dy = torch.randn(4, 3, 0), torch.randn(4, 3, 0)
    mean, var = ops.batch_norm_stats(x, 1)
    assert mean.shape == (1, 3) and mean.isnan().all() and var.isnan().all()  # as torch.var_mean of nothing
    zeros, ones = torch.zeros(1, 3), torch.ones(1, 3)
    assert ops.batch_norm_elemt(x, zeros, ones, None, None, 1e-5, 1).shape == x.shape
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, zeros, 1)
    assert not sum_dy.any() and not sum_dy_xmu.any()
    assert ops.batch_norm_backward_elemt(dy, x, zeros, ones, None, zeros, zeros, 1e-5, 0, 1).shape == x.shape


# 5. grad_output of another shape than the input (unchecked: reads past the buffer, wrong sums)
@case
def batch_norm_backward_blocks_check_grad_output():
    ops, zeros, ones = torch.ops.matterhorn, torch.zeros(1, 3), torch.ones(1, 3)
    raises(ValueError, r"grad_output must have the input's shape \[100000, 3\]", ops.batch_norm_backward_reduce,
           torch.randn(1, 3), torch.randn(100000, 3), zeros, 1)
    raises(ValueError, "grad_output must have the input's shape", ops.batch_norm_backward_elemt,
           torch.randn(1, 3), torch.randn(100, 3), zeros, ones, None, zeros, zeros, 1e-5, 100, 1)
    raises(ValueError, "grad_output must have the input's shape", ops.batch_norm_backward_reduce,
           torch.randn(3, 4), torch.randn(4, 3), zeros, 1)
    raises(TypeError, "grad_output must have the input's dtype", ops.batch_norm_backward_reduce,
           torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3), zeros, 1)
    raises(ValueError, "sum_dy must hold", ops.batch_norm_backward_elemt,
           torch.randn(4, 3), torch.randn(4, 3), zeros, ones, None, torch.zeros(1, 2), zeros, 1e-5, 4, 1)
    raises(ValueError, "count .* must be at least", ops.batch_norm_backward_elemt,
           torch.randn(4, 3), torch.randn(4, 3), zeros, ones, None, zeros, zeros, 1e-5, 2, 1)


# 6. a meta tensor beside CPU tensors (uninitialised memory, silently nothing)
@case
def batch_norm_blocks_refuse_mixed_devices():
    ops = torch.ops.matterhorn
    meta = dict(device="meta")
    raises(ValueError, "mean is on meta but the input is on cpu", ops.batch_norm_elemt,
           torch.randn(4, 3), torch.zeros(1, 3, **meta), torch.ones(1, 3), None, None, 1e-5, 1)
    raises(ValueError, "weight is on meta", ops.batch_norm_elemt,
           torch.randn(4, 3), torch.zeros(1, 3), torch.ones(1, 3), torch.ones(3, **meta), None, 1e-5, 1)
    raises(ValueError, "grad_output is on meta", ops.batch_norm_backward_reduce,
           torch.randn(4, 3, **meta), torch.randn(4, 3), torch.zeros(1, 3), 1)
    raises(ValueError, "mean is on meta", ops.layer_norm_backward,
           torch.randn(4, 3), torch.randn(4, 3), [3], torch.zeros(4, **meta), torch.ones(4), None)
    raises(ValueError, "mean is on meta but running_mean is on cpu", ops.batch_norm_update_stats,
           torch.zeros(1, 3, **meta), torch.ones(1, 3, **meta), 10, torch.zeros(3), torch.ones(3), None, 0.1)


@case
def batch_norm_blocks_on_meta_tensors_give_shapes():
    ops = torch.ops.matterhorn
    x = torch.empty(6, 3, 5, device="meta")
    mean, var = ops.batch_norm_stats(x, 2)
    assert mean.shape == (2, 3) and mean.device.type == "meta"
    assert ops.batch_norm_elemt(x, mean, var, None, None, 1e-5, 2).shape == x.shape
    raises(ValueError, "mean must hold", ops.batch_norm_elemt, x, mean[:, :2], var, None, None, 1e-5, 2)


# 7. more than 2^24 values per channel (a float32 count stops growing there: statistics 10% off)
@case
def batch_norm_statistics_above_two_to_the_24_values_per_channel():
    for layer, twin, shape in [(mth.snn.BatchNorm1d(1), nn.BatchNorm1d(1), (64, 131072, 1, 3)),
                               (mth.snn.BatchNorm2d(2), nn.BatchNorm2d(2), (32, 32768, 2, 5, 5))]:
        x = torch.randn(shape) * 3 + 5
        y = layer(x)
        with torch.no_grad():
            expected_mean = x.double().transpose(0, 2).flatten(1).mean(1)
            expected_var = x.double().transpose(0, 2).flatten(1).var(1)
        torch.testing.assert_close(layer.running_mean.double(), 0.9 * 0 + 0.1 * expected_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), 0.9 * 1 + 0.1 * expected_var, rtol=1e-6, atol=1e-6)
        assert abs(y.double().std().item() - 1) < 1e-4
        del x, y


# smaller ones
@case
def batch_norm_eps_as_torch_nn():
    raises(ValueError, "BatchNorm2d: eps must be positive", mth.snn.BatchNorm2d(3, eps=-1.0), torch.randn(2, 4, 3, 5, 5))
    raises(ValueError, "BatchNorm2d: eps must be positive", mth.snn.BatchNorm2d(3, eps=0.0), torch.randn(2, 4, 3, 5, 5))
    raises(ValueError, "BatchNorm2d: eps must be non-negative", mth.snn.BatchNorm2d(3, eps=-1e-5).eval(),
           torch.randn(2, 4, 3, 5, 5))
    same_as_folded(mth.snn.BatchNorm2d(3, eps=0.0).eval(), nn.BatchNorm2d(3, eps=0.0).eval(), torch.randn(2, 4, 3, 5, 5))
    raises(ValueError, "eps must be finite and non-negative", torch.ops.matterhorn.batch_norm_elemt,
           torch.randn(4, 3), torch.zeros(1, 3), torch.ones(1, 3), None, None, -1.0, 1)


@case
def batch_norm_num_batches_tracked_must_be_one_int64():
    m = mth.snn.BatchNorm2d(3)
    m.num_batches_tracked = torch.tensor([1, 2])
    raises(ValueError, "BatchNorm2d: num_batches_tracked must be a single torch.int64", m, torch.randn(2, 2, 3, 4, 4))
    m.num_batches_tracked = torch.tensor(1.0)
    raises(ValueError, "num_batches_tracked must be a single torch.int64", m, torch.randn(2, 2, 3, 4, 4))


@case
def batch_norm_update_stats_refuses_a_count_of_one():
    raises(ValueError, "count must be 0 or more than 1", torch.ops.matterhorn.batch_norm_update_stats,
           torch.zeros(1, 3), torch.ones(1, 3), 1, torch.zeros(3), torch.ones(3), None, 0.1)


def main(names):
    for name in names or CASES:
        print(json.dumps({"case": name, "status": "started"}), flush=True)
        try:
            CASES[name]()
            result = {"case": name, "status": "ok"}
        except Exception as error:  # the parent reports it against the case
            result = {"case": name, "status": "failed", "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
