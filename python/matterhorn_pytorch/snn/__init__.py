"""Spiking neural network layers. Every class is also reachable as ``snn.synapse.X``."""

from . import attention, skeleton, synapse
from .attention import MultiheadAttention
from .skeleton import Module
from .synapse import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormThroughTime1d,
    BatchNormThroughTime2d,
    BatchNormThroughTime3d,
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    LayerNorm,
    Linear,
    Synapse,
    TemporalEffectiveBatchNorm1d,
    TemporalEffectiveBatchNorm2d,
    TemporalEffectiveBatchNorm3d,
    ThresholdDependentBatchNorm1d,
    ThresholdDependentBatchNorm2d,
    ThresholdDependentBatchNorm3d,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    WSLinear,
    convert_sync_batchnorm,
)

__all__ = ["Module", "Synapse", "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
           "ConvTranspose3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "WSLinear", "WSConv1d", "WSConv2d",
           "WSConv3d", "convert_sync_batchnorm", "ThresholdDependentBatchNorm1d", "ThresholdDependentBatchNorm2d",
           "ThresholdDependentBatchNorm3d", "TemporalEffectiveBatchNorm1d", "TemporalEffectiveBatchNorm2d",
           "TemporalEffectiveBatchNorm3d", "BatchNormThroughTime1d", "BatchNormThroughTime2d", "BatchNormThroughTime3d",
           "MultiheadAttention", "attention", "skeleton", "synapse"]
