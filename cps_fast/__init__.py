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
from .backends import BackendUnavailable, available_backends
from .loss import CPSLoss, CPSLossFunction, cps_loss
from .ncps_loss import NCPSLoss, NCPSLossFunction, ncps_loss
from .upsample_loss import CPSLossUpsampled, cps_loss_upsampled

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "CPSLoss",
    "CPSLossFunction",
    "CPSLossUpsampled",
    "NCPSLoss",
    "NCPSLossFunction",
    "available_backends",
    "cps_loss",
    "cps_loss_upsampled",
    "ncps_loss",
    "__version__",
]
