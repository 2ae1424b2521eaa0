"""Loads the compiled core after checking it was built for the running torch."""

import torch


def check_torch_version(built: str, running: str) -> None:
    """Raise ImportError unless ``built`` and ``running`` torch share major.minor.

    A compiled extension works only with the torch minor release it was compiled against.
    """
    if built.split("+")[0].split(".")[:2] != running.split("+")[0].split(".")[:2]:
        raise ImportError(
            f"matterhorn_pytorch was built against torch {built} but torch {running} is running; "
            "rebuild it for this torch: pip install --no-build-isolation -e . "
            "(or pip install --force-reinstall --no-build-isolation matterhorn-pytorch)"
        )


def load_core():
    """Import ``_C``, which loads libmatterhorn and registers the ``torch.ops.matterhorn`` ops."""
    try:
        from . import _build_config
    except ImportError as error:
        raise ImportError(
            "matterhorn_pytorch's compiled core is missing: build it with "
            "pip install --no-build-isolation -e ."
        ) from error
    check_torch_version(_build_config.TORCH_VERSION, torch.__version__)
    from . import _C

    return _C
