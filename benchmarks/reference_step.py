"""The reference code's loss inside the CPS step: the baseline of the step benchmark.

``bench_step.py``'s ``reference`` variant trains with :class:`ReferenceStep` in place of
:class:`cps_fast.train.CPSStep` (``Trainer(..., step_class=ReferenceStep)``). It shares
the step's pseudo labels (the CutMix boxes, the teachers) and student passes, and computes
the loss as the reference code (TorchSemiSeg's ``train.py``) does: full-resolution logits,
each branch's argmax, and four separate ``F.cross_entropy`` calls, two supervised and two
cross. Its value equals the fused step's (tests/test_train.py); what differs is the time and
the memory: the logits are read several times and their gradients come from autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cps_fast.train.step import CPSStep


class ReferenceStep(CPSStep):
    """:class:`CPSStep` with the reference code's unfused loss (two branches, no fused upsampling)."""

    def __init__(self, model, **kwargs):
        if len(model.branches) != 2:
            raise ValueError(f"ReferenceStep is the two-branch reference code's loss; this model has "
                             f"{len(model.branches)} branches")
        super().__init__(model, **kwargs)

    def _upsample_unavailable(self, loss_backend) -> str:
        return "is not the reference code's loss, which takes full-resolution logits"

    def loss(self, out_l, out_u, label_l, pseudo):
        return self._reference_loss(out_l, out_u, label_l, pseudo)

    def _reference_loss(self, out_l, out_u, label_l, pseudo):
        """Argmax and four separate cross-entropies; ``(loss, sup, cps)`` as :meth:`CPSStep.loss`."""
        ignore = self.ignore_index
        (a_l, b_l), (a_u, b_u) = out_l, out_u
        if self.cutmix:
            pseudo_a_u, pseudo_b_u = pseudo
            cps = (F.cross_entropy(a_u.float(), pseudo_b_u.long()) + F.cross_entropy(b_u.float(), pseudo_a_u.long()))
        else:
            pred_a, pred_b = torch.cat([a_l, a_u]).float(), torch.cat([b_l, b_u]).float()
            cps = (F.cross_entropy(pred_a, pred_b.detach().argmax(1))
                   + F.cross_entropy(pred_b, pred_a.detach().argmax(1)))
        if self.sup_loss == "ohem":
            sup = self._sup(a_l, label_l) + self._sup(b_l, label_l)
        else:
            lab = label_l.long()
            sup = (F.cross_entropy(a_l.float(), lab, ignore_index=ignore)
                   + F.cross_entropy(b_l.float(), lab, ignore_index=ignore))
        return sup + self.cps_weight * cps, sup.detach(), cps.detach()
