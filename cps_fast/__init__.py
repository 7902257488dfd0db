"""cps-fast: semi-supervised semantic segmentation with Cross Pseudo Supervision, fast.

The fused loss in two lines::

    import cps_fast
    loss = cps_fast.cps_loss(logits_a, logits_b, target, cps_weight=1.5)

Also: :func:`cps_loss_upsampled` (the same loss from decoder-resolution logits, the
bilinear upsampling fused in) and :func:`ncps_loss` (n-CPS, K >= 2 branches).

Subpackages: :mod:`cps_fast.models` (DeepLabv3+), :mod:`cps_fast.data`
(datasets, DALI and PyTorch loaders, CutMix masks), :mod:`cps_fast.train`
(the trainer), :mod:`cps_fast.eval` (mIoU, sliding-window inference).
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _load_checkout_kernels() -> None:
    """In a source checkout (this folder on ``sys.path``, nothing installed), load the top-level
    ``kernels/`` as :mod:`cps_fast.kernels`, as an install maps it (setup.py's ``package_dir``).

    An installed package holds its own ``kernels/`` and needs nothing. This runs at import, before
    anything imports ``cps_fast.kernels``, so that another install's import hook (an editable
    install of a different checkout) cannot answer for it first."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    if "cps_fast.kernels" in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")):
        return
    init = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if not _os.path.isfile(init):
        return  # neither: backends.triton_kernels_import_error() says so, and the triton backend is not chosen
    spec = _importlib_util.spec_from_file_location("cps_fast.kernels", init,
                                                   submodule_search_locations=[_os.path.dirname(init)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["cps_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules["cps_fast.kernels"]
        raise
    globals()["kernels"] = module  # what the import system sets on a parent package


_load_checkout_kernels()

from .backends import BackendUnavailable, available_backends  # noqa: E402
from .fused import FusedLossFunction  # noqa: E402
from .loss import CPSLoss, CPSLossFunction, cps_loss  # noqa: E402
from .ncps_loss import NCPSLoss, NCPSLossFunction, ncps_loss  # noqa: E402
from .upsample_loss import CPSLossUpsampled, cps_loss_upsampled  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "CPSLoss",
    "CPSLossFunction",
    "CPSLossUpsampled",
    "FusedLossFunction",
    "NCPSLoss",
    "NCPSLossFunction",
    "available_backends",
    "cps_loss",
    "cps_loss_upsampled",
    "ncps_loss",
    "__version__",
]
