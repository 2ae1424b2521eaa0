"""Spiking neural network layers. Every class is also reachable as ``snn.synapse.X``."""

from . import skeleton, synapse
from .skeleton import Module
from .synapse import Linear, Synapse

__all__ = ["Module", "Synapse", "Linear", "skeleton", "synapse"]
