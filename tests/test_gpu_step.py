"""The training step on a GPU: captured and eager make the same update, no host synchronisation, learning.

Every test here needs CUDA (marked ``gpu``: skipped on CI's machines; benchmarks/run_gpu.sh's
tests step runs them with ``-m gpu``). The captured step is checked in the configurations that
take different paths through it: two branches with the upsample-fused loss (the default), n-CPS
with K = 3 branches (cps_fast.ncps_loss), the fused loss on full-resolution logits
(``fused_upsample=False``), and OHEM's supervised term (a top-k on the device).

A capture fails on any host synchronisation inside the step, and a replay cannot synchronise,
so the no-sync checks wrap the host loop, :meth:`Trainer.run`: loading, copying in, replaying or
stepping eagerly, and deciding when to log.
"""
import itertools
import json
import math

import pytest
import torch

from cps_fast.data import labeled_loader
from cps_fast.train import Trainer
from helpers import host_syncs_raise
from test_train import _gpu_cfg  # tests/test_profiling.py's GPU tests use it too

pytestmark = pytest.mark.gpu

# the captured step's paths (CutMix is set per test: its boxes differ between graph and eager)
VARIANTS = {
    "cps": {},
    "ncps3": dict(branches=3),
    "unfused_upsample": dict(fused_upsample=False),
    "ohem": dict(sup_loss="ohem", ohem_min_kept=500),
}


def _quiet(*args, **kwargs):
    pass


def _step_state(t: Trainer) -> list[torch.Tensor]:
    """Every tensor a step reads and writes: parameters first, buffers, momentum, the device scalars."""
    return ([p.data for p in t.model.parameters()] + list(t.model.buffers())
            + [x for group in t.optimizer.buffers for x in group] + [t.iteration, t.lr, t.sums, t.first_bad])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_graph_step_equals_eager_without_cutmix(tmp_path, variant):
    """A replayed step and an eager step, from the same state on the same batch, give the same
    loss and parts, gradients, update and BatchNorm statistics (bf16 tolerance for what backward
    computes). Whole runs are not compared: bf16 training is chaotic, and cuDNN's and
    interpolate's backward atomics make two runs drift apart within a few steps (on the CPU, 1e-4
    relative noise in 5 % of the gradients failed 99 of 168 tensors after 24 steps). No CutMix,
    whose boxes come from different generators in the two modes."""
    t = Trainer(_gpu_cfg(cutmix=False, cps_weight=1.5, **VARIANTS[variant]), tmp_path, device="cuda", print_fn=_quiet)
    b = next(iter(labeled_loader(t.labeled_set, batch_size=4, crop_size=64, backend="pytorch", num_workers=0)))
    batch = [t._to_device(b["image"]), t._to_device(b["label"]), t._to_device(b["image"].flip(-1)), None]
    t.model.train()
    t._capture(lambda: batch)  # 3 eager warm-up steps, the capture and one replay: a trained-in state
    torch.cuda.synchronize()
    state = _step_state(t)
    saved = [x.clone() for x in state]
    named = list(t.model.named_parameters())

    def run(how):
        for x, s0 in zip(state, saved):  # in place: the graph holds these addresses
            x.copy_(s0)
        t.sums.zero_()
        if how == "graph":
            t._copy_in(batch)
            t.graph.replay()  # writes the gradients into the .grad tensors made during the capture
        else:
            t._step(*batch)
        torch.cuda.synchronize()
        grads = [None if p.grad is None else p.grad.detach().clone() for _, p in named]
        updates = [p.detach() - s0 for (_, p), s0 in zip(named, saved)]
        return t.sums[:3].clone(), grads, updates, [x.clone() for x in t.model.buffers()]

    sums_g, grads_g, upd_g, buf_g = run("graph")
    sums_e, grads_e, upd_e, buf_e = run("eager")
    # the same forward on the same values: the loss kernels' atomic sums and, should cuDNN pick other
    # algorithms inside the capture, bf16 convolution rounding (averaged over every pixel) may differ
    assert bool(torch.isfinite(sums_e).all()) and float(sums_e[0]) > 0, f"eager loss, sup, cps: {sums_e.tolist()}"
    torch.testing.assert_close(sums_g, sums_e, rtol=2e-3, atol=1e-5, msg=lambda m: f"loss, sup, cps: {m}")
    assert [g is None for g in grads_g] == [g is None for g in grads_e], "graph and eager differ in which grads exist"
    assert any(g is not None and float(g.abs().max()) > 0 for g in grads_e), "the eager step computed no gradient"
    for (name, _), gg, ge, ug, ue in zip(named, grads_g, grads_e, upd_g, upd_e):
        for what, x, y in (("grad", gg, ge), ("update", ug, ue)):
            if y is None:
                continue
            scale = float(y.abs().max())
            torch.testing.assert_close(x, y, rtol=5e-2, atol=5e-2 * scale + 1e-12, msg=lambda m: f"{name} {what}: {m}")
    for bg, be in zip(buf_g, buf_e):
        if be.dtype.is_floating_point:
            torch.testing.assert_close(bg, be, rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(bg, be)  # BatchNorm's num_batches_tracked


@pytest.mark.parametrize("variant", ["cps", "ncps3"])
def test_captured_step_has_no_host_sync_and_learns(tmp_path, variant):
    """With CutMix (new boxes from the default CUDA generator at each replay): Trainer.run's
    host loop around the captured step never synchronises, on the real loader and on a fixed
    set of batches, and on those the loss, read between the checked windows, falls."""
    t = Trainer(_gpu_cfg(max_iters=200, log_every=1000, **VARIANTS[variant]), tmp_path, device="cuda",
                print_fn=_quiet)
    t.model.train()
    batches = t.batches()
    # eagerly 3 warm-up steps (cuDNN autotuning, Triton builds), the capture, then replays
    assert t.run(16, batches=batches) == 16 and t.graph is not None
    with host_syncs_raise(sync_first=True):  # the real loop: load, copy into the graph's inputs, replay; no log falls due
        assert t.run(24, batches=batches) == 24
    fixed = [next(batches) for _ in range(4)]
    t.sums.zero_()
    losses = []
    for stop in (34, 44, 54):
        with host_syncs_raise(sync_first=True):
            t.run(stop, batches=itertools.cycle(fixed))
        s = t.sums.tolist()  # a host read, outside the check: the trainer makes it once per log_every
        t.sums.zero_()
        assert s[3] == 10, s
        losses.append(s[0] / s[3])
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses


def test_eager_step_has_no_host_sync(tmp_path):
    """--no-cuda-graph with bf16: Trainer.run's eager loop (loading, copying to the device, the
    step with CutMix boxes from the trainer's own CUDA generator, SGD) never synchronises."""
    t = Trainer(_gpu_cfg(cuda_graph=False, max_iters=200, log_every=1000), tmp_path, device="cuda", print_fn=_quiet)
    t.model.train()
    batches = t.batches()
    t.run(2, batches=batches)  # first calls: cuDNN autotuning, Triton builds
    with host_syncs_raise(sync_first=True):
        assert t.run(5, batches=batches) == 5
    assert t.graph is None
    s = t.sums.tolist()
    assert s[3] == 5 and math.isfinite(s[0]), s


def test_ohem_step_is_captured(tmp_path):
    """The Cityscapes presets' OHEM (top-k on CUDA) inside the captured step, through
    Trainer.train (capture, replays, logging, evaluation, checkpoint): the replays train to
    finite losses."""
    t = Trainer(_gpu_cfg(sup_loss="ohem", ohem_min_kept=500, max_iters=18, log_every=6), tmp_path, device="cuda",
                print_fn=_quiet)
    t.train()
    assert t.graph is not None
    hist = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in hist if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses), hist
