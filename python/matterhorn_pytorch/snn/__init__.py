"""Spiking neural network layers. Every class is also reachable as ``snn.synapse.X``."""

from . import skeleton, synapse
from .skeleton import Module
from .synapse import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    Linear,
    Synapse,
)

__all__ = ["Module", "Synapse", "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
           "ConvTranspose3d", "skeleton", "synapse"]
