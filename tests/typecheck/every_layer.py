"""A user's script that builds and calls every layer; the type checker must find nothing wrong."""

from typing import Optional, Tuple

import torch

import matterhorn_pytorch as mth

x = torch.rand(4, 2, 3, 8, 8)
linear = mth.snn.Linear(8, 5, bias=False, multi_time_step=True, batch_first=False)
y: torch.Tensor = linear(x)
for conv in (mth.snn.Conv1d(3, 4, 3, padding="same"), mth.snn.Conv2d(3, 4, (3, 3), stride=1, padding_mode="reflect"),
             mth.snn.Conv3d(3, 4, 1, dilation=(1, 1, 1), groups=1, multi_time_step=False)):
    y = conv(x)
for transposed in (mth.snn.ConvTranspose1d(3, 4, 3, output_padding=0), mth.snn.ConvTranspose2d(3, 4, 2, stride=2),
                   mth.snn.ConvTranspose3d(3, 4, 1, dilation=1, batch_first=True)):
    y = transposed(x, output_size=[8, 8])
for norm in (mth.snn.BatchNorm1d(3, momentum=None), mth.snn.BatchNorm2d(3, per_step=True, sync=False),
             mth.snn.BatchNorm3d(3, 1e-3, 0.1, True, False, bias=False)):
    y = norm(x)
layer_norm = mth.snn.LayerNorm([8, 8], eps=1e-6, elementwise_affine=True, bias=True)
y = layer_norm(x)
mth.snn.convert_sync_batchnorm(torch.nn.Sequential(norm), process_group=None)
step: mth.snn.Module = layer_norm.single_step_mode_().multi_step_mode_(True, recursive=False)
spikes = x.bernoulli()
for standardized in (mth.snn.WSConv1d(3, 4, 3, affine=False, eps=1e-5), mth.snn.WSConv2d(3, 4, 3, spike_input=True),
                     mth.snn.WSConv3d(3, 4, 1, padding_mode="zeros", multi_time_step=True)):
    y = standardized(spikes)
y = mth.snn.WSLinear(8, 5, True, True, 1e-6, spike_input=True)(spikes)
attention = mth.snn.MultiheadAttention(8, 2, dropout=0.0, kdim=8, vdim=8, batch_first=False)
attended: Tuple[torch.Tensor, Optional[torch.Tensor]] = attention(x, x, x, need_weights=False, is_causal=False)
for temporal in (mth.snn.ThresholdDependentBatchNorm1d(1.0, 0.5, 3), mth.snn.ThresholdDependentBatchNorm2d(1.0, 0.5, 3),
                 mth.snn.ThresholdDependentBatchNorm3d(1.0, 0.5, 3, eps=1e-5, momentum=None),
                 mth.snn.TemporalEffectiveBatchNorm1d(4, 3), mth.snn.TemporalEffectiveBatchNorm2d(4, 3, affine=False),
                 mth.snn.TemporalEffectiveBatchNorm3d(4, 3, batch_first=True), mth.snn.BatchNormThroughTime1d(4, 3),
                 mth.snn.BatchNormThroughTime2d(4, 3, sync=False), mth.snn.BatchNormThroughTime3d(4, 3, 1e-5, 0.1)):
    y = temporal(x)
