"""Checkpoints: written atomically, read with ``weights_only=True``."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash while writing leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a cps-fast checkpoint; never unpickles code.

    Raises :class:`CheckpointError` (one line naming the file) for a missing, empty, truncated or
    foreign file, and for one that holds pickled code (refused, not run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted copy? "
                              f"expected a file written by cps-fast")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's "Weights only load failed": code or foreign objects
        first = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(f"checkpoint {path} holds objects that weights_only=True refuses to load "
                              f"(pickled code or classes: {first or 'not plain tensors and containers'}); "
                              f"cps-fast writes only tensors, numbers and strings, so this file is not one "
                              f"of its checkpoints") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} ({size} bytes) cannot be read: it is truncated or not a "
                              f"torch file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                              ) from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has no 'model' and 'config' entries (found {keys}); "
                              f"expected a file written by cps-fast (last.pt or best.pt)")
    return state
