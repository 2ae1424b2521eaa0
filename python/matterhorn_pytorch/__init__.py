"""matterhorn_pytorch: time-folded synapse layers for spiking neural networks.

Layers take spike trains ``[T, B, ...]`` (multi-step, the default) or ``[B, ...]`` (single-step)
and compute through the C++ ops ``torch.ops.matterhorn.*``.
"""

import os as _os

from ._loader import load_core as _load_core

_C = _load_core()

from . import snn  # noqa: E402  (needs the ops registered by _C)
from .fuse import fuse  # noqa: E402

__version__ = _C.build_info()["version"]

# For C++ users: CMAKE_PREFIX_PATH entry with which find_package(matterhorn) finds this copy
# (beside torch.utils.cmake_prefix_path for find_package(Torch)).
cmake_prefix_path = _os.path.join(_os.path.dirname(_C.__file__), "share", "cmake")



def save_state_dict(module, path) -> None:
    """Save ``module``'s parameters and buffers for the C++ API (``matterhorn::load_state_dict``):
    ``torch.save`` of a plain dict {name: tensor}, which torch's C++ unpickler reads (it cannot
    read the OrderedDict that ``module.state_dict()`` returns)."""
    import torch

    torch.save({name: tensor.detach() for name, tensor in module.state_dict().items()}, path)


__all__ = ["snn", "fuse", "cmake_prefix_path", "save_state_dict", "__version__"]
