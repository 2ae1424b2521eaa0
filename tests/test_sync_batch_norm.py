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
