"""matterhorn_pytorch: time-folded synapse layers for spiking neural networks.

Layers take spike trains ``[T, B, ...]`` (multi-step, the default) or ``[B, ...]`` (single-step)
and compute through the C++ ops ``torch.ops.matterhorn.*``.
"""

from ._loader import load_core as _load_core

_C = _load_core()

from . import snn  # noqa: E402  (needs the ops registered by _C)

__version__ = _C.build_info()["version"]

__all__ = ["snn", "__version__"]
