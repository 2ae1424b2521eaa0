"""MultiheadAttention over time: mth.snn.MultiheadAttention on [T, B, N, C] against
torch.nn.MultiheadAttention on the folded [T, B*N, C] tensor (batch_first: [B*N, T, C], the
permuting copy included, as a user of torch.nn must make it), self-attention of spikes.

    .venv/bin/python bench/bench_attention.py [--quick]

``--quick`` is a smoke run of the script: one short round per case, on T=2 B=1, one thread (its
times say nothing about speed).
"""

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import matterhorn_pytorch as mth  # noqa: E402
from common import Case, main, training_step  # noqa: E402

QUICK = "--quick" in sys.argv[1:]


def attention_cases(T, B, N, embed_dim, heads, batch_first=False, need_weights=False):
    if QUICK:
        T, B = 2, 1
    torch.manual_seed(0)
    label = (f"MHA {embed_dim}/{heads} heads, T={T} B={B} N={N}" + (", batch_first" if batch_first else "")
             + (", weights" if need_weights else ""))
    ours = mth.snn.MultiheadAttention(embed_dim, heads, batch_first=batch_first)
    fold = nn.MultiheadAttention(embed_dim, heads, batch_first=batch_first)
    fold.load_state_dict(ours.state_dict())
    shape = (B, T, N, embed_dim) if batch_first else (T, B, N, embed_dim)
    spikes = (torch.rand(shape) < 0.15).float()  # spikes at 15% density
    x_ours = spikes.clone().requires_grad_()
    x_fold = spikes.clone().requires_grad_()

    def run_ours(x):
        return ours(x, x, x, need_weights=need_weights)[0]

    def run_fold(x):
        if batch_first:  # [B, T, N, C] -> [B*N, T, C] and back
            steps = x.transpose(1, 2).flatten(0, 1)
            return fold(steps, steps, steps, need_weights=need_weights)[0].unflatten(0, (B, N)).transpose(1, 2)
        steps = x.flatten(1, 2)
        return fold(steps, steps, steps, need_weights=need_weights)[0].unflatten(1, (B, N))

    def inference(layer, forward, x):
        def run():
            layer.eval()
            with torch.no_grad():
                forward(x)
            layer.train()
        return run

    return [
        Case(f"{label} fwd", inference(ours, run_ours, x_ours), inference(fold, run_fold, x_fold)),
        Case(f"{label} fwd+bwd", training_step(ours, run_ours, x_ours), training_step(fold, run_fold, x_fold)),
    ]


if __name__ == "__main__":
    if QUICK:
        torch.set_num_threads(1)
    main("MultiheadAttention over time, CPU",
         attention_cases(4, 16, 64, 256, 8)  # Spikformer-like: tokens fold into the batch, attention over T
         + attention_cases(8, 4, 16, 128, 4)
         + attention_cases(4, 16, 64, 256, 8, batch_first=True)
         + attention_cases(4, 16, 64, 256, 8, need_weights=True))
