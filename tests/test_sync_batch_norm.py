"""BatchNorm statistics synchronised across two processes over gloo, against one process
holding the whole batch."""

import os

import pytest
import torch
import torch.distributed as distributed
import torch.multiprocessing as multiprocessing

import matterhorn_pytorch as mth

T, B, C, H, W = 3, 4, 3, 5, 4
STEPS = 2


def make_model(per_step):
    torch.manual_seed(0)
    model = torch.nn.Sequential(mth.snn.Conv2d(2, C, 3, padding=1), mth.snn.BatchNorm2d(C, per_step=per_step)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(T, B, 2, H, W, generator=generator, dtype=torch.float64) * 2 + 1,
             torch.randn(T, B, C, H, W, generator=generator, dtype=torch.float64)) for _ in range(STEPS)]


def run(model, rank=None, world=1):
    """STEPS training steps; returns the outputs, input gradients, parameter gradients and buffers."""
    results = {"outputs": [], "input_grads": [], "param_grads": [], "buffers": []}
    half = slice(None) if rank is None else slice(rank * B // world, (rank + 1) * B // world)
    for x, grad in batches():
        x = x[:, half].clone().requires_grad_()
        model.zero_grad()
        y = model(x)
        y.backward(grad[:, half])
        results["outputs"].append(y.detach())
        results["input_grads"].append(x.grad)
        results["param_grads"].append([p.grad.clone() for p in model.parameters()])
        results["buffers"].append([b.clone() for b in model.buffers()])
    return results


def worker(rank, world, init_file, per_step, out_dir):
    distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = mth.snn.convert_sync_batchnorm(make_model(per_step))
        torch.save(run(model, rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.destroy_process_group()


@pytest.mark.parametrize("per_step", [False, True], ids=["all-steps", "per-step"])
def test_two_processes_over_gloo_equal_one_process_with_the_whole_batch(tmp_path, per_step):
    multiprocessing.spawn(worker, args=(2, str(tmp_path / "init"), per_step, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = run(make_model(per_step))
    for step in range(STEPS):
        for key in ("outputs", "input_grads"):  # halves of the batch dimension
            torch.testing.assert_close(torch.cat([r[key][step] for r in ranks], dim=1), whole[key][step])
        for a, b, full in zip(ranks[0]["param_grads"][step], ranks[1]["param_grads"][step], whole["param_grads"][step]):
            torch.testing.assert_close(a + b, full)  # what DDP's all-reduce (sum) of the local gradients gives
        for rank in ranks:  # every process holds the whole batch's running statistics
            for buffer, full in zip(rank["buffers"][step], whole["buffers"][step]):
                torch.testing.assert_close(buffer, full)


def test_converted_layer_shows_sync_and_runs_alone_without_a_process_group():
    model = mth.snn.convert_sync_batchnorm(make_model(False))
    assert "sync=True" in repr(model[1])
    x = torch.randn(T, B, 2, H, W, dtype=torch.float64)
    reference = make_model(False)
    torch.testing.assert_close(model(x), reference(x))  # no process group: plain local statistics


# ---- uneven shards against a float64 whole-batch reference in plain torch ------------------------

from test_temporal_norm import bntt_definition, folded_batch_norm, tdbn_definition, tebn_definition  # noqa: E402

SHARDS = [slice(0, 1), slice(1, 5), slice(5, 5)]  # one sample, many, none (an empty shard)
UNEVEN_B, UNEVEN_H, UNEVEN_W = 5, 3, 2


def per_step_definition(x, params, state, training, momentum, eps):
    """A loop of torch.nn-like BatchNorm calls over t, affine shared: T updates of [C] running statistics."""
    outputs = []
    for t in range(x.shape[0]):
        outputs.append(folded_batch_norm(x[t:t + 1], params.get("weight"), params.get("bias"), state, training,
                                         momentum, eps)[0])
    return torch.stack(outputs)


UNEVEN_CASES = {  # (layer factory, definition, dtype)
    "BatchNorm2d": (lambda: mth.snn.BatchNorm2d(C), tdbn_definition, torch.float64),
    "affine=False-momentum=None": (lambda: mth.snn.BatchNorm2d(C, affine=False, momentum=None),
                                   tdbn_definition, torch.float64),
    "per_step": (lambda: mth.snn.BatchNorm2d(C, per_step=True), per_step_definition, torch.float64),
    "bfloat16": (lambda: mth.snn.BatchNorm2d(C), tdbn_definition, torch.bfloat16),
    "tdBN": (lambda: mth.snn.ThresholdDependentBatchNorm2d(0.5, 2.0, C), tdbn_definition, torch.float64),
    "TEBN": (lambda: mth.snn.TemporalEffectiveBatchNorm2d(T, C), tebn_definition, torch.float64),
    "BNTT-momentum=None": (lambda: mth.snn.BatchNormThroughTime2d(T, C, momentum=None), bntt_definition,
                           torch.float64),
}


def uneven_layer(case):
    torch.manual_seed(2)
    factory, _, dtype = UNEVEN_CASES[case]
    layer = factory().to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    return layer


def uneven_batches(dtype):
    """Two training batches and one eval batch [T, B, C, H, W], with output gradients."""
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(T, UNEVEN_B, C, UNEVEN_H, UNEVEN_W, generator=generator, dtype=torch.float64).mul(2).add(1)
             .to(dtype), torch.randn(T, UNEVEN_B, C, UNEVEN_H, UNEVEN_W, generator=generator,
                                     dtype=torch.float64).to(dtype)) for _ in range(3)]


def uneven_worker(rank, world, init_file, out_dir):
    distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for case in UNEVEN_CASES:
            layer = mth.snn.convert_sync_batchnorm(uneven_layer(case))
            runs = []
            for step, (x, grad) in enumerate(uneven_batches(UNEVEN_CASES[case][2])):
                layer.train(step < 2)
                x = x[:, SHARDS[rank]].clone().requires_grad_()
                layer.zero_grad()
                y = layer(x)
                y.backward(grad[:, SHARDS[rank]])
                runs.append({"output": y.detach(), "input_grad": x.grad,
                             "param_grads": {n: p.grad.clone() for n, p in layer.named_parameters()},
                             "buffers": {n: b.clone() for n, b in layer.named_buffers()}})
            results[case] = runs
        torch.save(results, os.path.join(out_dir, f"uneven{rank}.pt"))
    finally:
        distributed.destroy_process_group()


def test_uneven_shards_one_sample_many_and_none_equal_a_float64_whole_batch_reference(tmp_path):
    """A merge that weights every process equally, or lets an empty shard's NaN statistics in,
    fails here: shards of 1, 4 and 0 samples."""
    multiprocessing.spawn(uneven_worker, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    ranks = [torch.load(tmp_path / f"uneven{r}.pt") for r in range(3)]
    for case, (_, definition, dtype) in UNEVEN_CASES.items():
        layer = uneven_layer(case)
        params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
        state = [None if b is None else b.detach().clone().double() if b.is_floating_point() else b.clone()
                 for b in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
        # bfloat16: the input and gradients are rounded alike; float32 sums, outputs rounded to 8 bits
        tolerance = dict(rtol=2e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-7, atol=1e-7)
        for step, (x, grad) in enumerate(uneven_batches(dtype)):
            x = x.double().requires_grad_()
            for p in params.values():
                p.grad = None
            y = definition(x, params, state, step < 2, layer.momentum, layer.eps)
            y.backward(grad.double())
            got = [r[case][step] for r in ranks]
            torch.testing.assert_close(torch.cat([g["output"] for g in got], 1).double(), y, **tolerance,
                                       msg=lambda m: f"{case} step {step} output: {m}")
            torch.testing.assert_close(torch.cat([g["input_grad"] for g in got], 1).double(), x.grad, **tolerance,
                                       msg=lambda m: f"{case} step {step} input gradient: {m}")
            for n, p in params.items():  # local gradients, summed as DDP would
                total = sum(g["param_grads"][n].double() for g in got)
                torch.testing.assert_close(total, p.grad, **tolerance, msg=lambda m: f"{case} step {step} {n}: {m}")
            for g in got:  # every process holds the whole batch's running statistics
                for n, value in zip(("running_mean", "running_var", "num_batches_tracked"), state):
                    torch.testing.assert_close(g["buffers"][n].to(value.dtype), value, **tolerance,
                                               msg=lambda m: f"{case} step {step} {n}: {m}")
