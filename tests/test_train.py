"""The trainer: the step, SGD, checkpoints, bit-exact resume, torchrun, the CLI (OHEM: test_ohem.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cps_fast.cli import run as cli_main
from cps_fast.config import load_preset
from cps_fast.models import CPSModel, param_groups
from cps_fast.models.weights import PretrainedWeightsError
from cps_fast.train import SGD, CPSStep, Trainer, load_checkpoint, poly_lr

TINY = dict(data_root="seed=0,n=24,size=48", crop_size=32, batch_size_labeled=2, batch_size_unlabeled=2,
            scales=(0.75, 1.0, 1.25), partition="1/4", max_iters=8, lr=0.01, eval_every=0, eval_crop_size=48,
            eval_max_items=4, eval_batch_size=4, log_every=2, num_workers=0, data_backend="pytorch", amp="fp32")
# amp: fp32, not the demo's bf16 autocast, which on a CPU without bf16 instructions (CI's) takes the
# slow convolutions, about 1.4x the run; the trainer under CPU bf16 autocast: tests/test_resume.py,
# tests/test_run_safety.py
TINY_SET = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TINY.items()]


def tiny_cfg(**kw):
    return load_preset("demo").replace(**{**TINY, **kw})


def tiny_model(C=7):
    return CPSModel("resnet18", C, 16, False, None)


# every step variant (branches, fused upsampling, n-CPS ensemble) once, each CutMix setting, each
# supervised loss and each layout twice, every pair of CutMix and loss once (the exact-formulation tests
# below pin each variant's value; this one asserts that it learns). The demo's 64-channel head. The
# trainer's runs below are channels_last throughout (the default), which on a CPU makes these small
# steps much longer than NCHW (oneDNN's reorders in the convolutions' backward).
VARIANTS = [(2, True, False), (2, False, False), (3, False, False), (3, False, True)]
PAIRS = [(False, "ce"), (True, "ohem"), (False, "ohem"), (True, "ce")]
LAYOUTS = ["channels_last", "nchw", "nchw", "channels_last"]


@pytest.mark.parametrize("branches,fused_upsample,ensemble,cutmix,sup_loss,layout",
                         [(*v, *p, f) for v, p, f in zip(VARIANTS, PAIRS, LAYOUTS)])
def test_step_loss_decreases_on_a_fixed_batch(branches, fused_upsample, ensemble, cutmix, sup_loss, layout):
    torch.manual_seed(0)
    model = CPSModel("resnet18", 7, 16, False, None, seeds=tuple(range(branches)), head_channels=64)
    layout = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=layout)
    step = CPSStep(model, cutmix=cutmix, cps_weight=1.5, sup_loss=sup_loss, ohem_min_kept=100,
                   fused_upsample=fused_upsample, ncps_ensemble=ensemble)
    assert step.fused_upsample == fused_upsample
    opt = SGD(param_groups(model, 1e-4), momentum=0.9)
    img_l = torch.randn(2, 3, 33, 29).contiguous(memory_format=layout)
    label = torch.randint(0, 7, (2, 33, 29), dtype=torch.uint8)
    label[:, :3] = 255
    u0, u1 = torch.randn(2, 3, 33, 29), torch.randn(2, 3, 33, 29)
    mask = torch.zeros(2, 1, 33, 29)
    mask[:, :, 5:20, 4:15] = 1
    losses = []
    lr = torch.tensor(0.01)
    for _ in range(8):
        opt.zero_grad()
        loss, sup, cps = step(img_l, label, u0, u1 if cutmix else None, mask if cutmix else None)
        assert torch.isfinite(loss) and not sup.requires_grad
        loss.backward()
        opt.step(lr)
        losses.append(loss.item())
    # mostly the cross term falling; 8 steps at lr 0.01 are chaotic in float rounding (thread count,
    # per-image vs pooled OHEM weights: 0.50 to 0.81 of the first loss seen for one case); no learning ~1.0
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("fused_upsample", [False, True])
def test_cutmix_step_matches_the_reference_formulation(fused_upsample):
    """One fused call on [labeled; mixed] == the reference's separate sup and cps cross-entropies."""
    torch.manual_seed(1)
    model = tiny_model().eval()  # eval: BatchNorm uses running stats, so passes are comparable
    step = CPSStep(model, cutmix=True, cps_weight=1.0, fused_upsample=fused_upsample)
    img_l, u0, u1 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 7, (2, 32, 32))
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss, sup, cps = step(img_l, label, u0, u1, mask)
    a, b = model.branch_a, model.branch_b
    with torch.no_grad():
        ps_a = (a(u0) * (1 - mask) + a(u1) * mask).argmax(1)  # the reference mixes logits, then argmax
        ps_b = (b(u0) * (1 - mask) + b(u1) * mask).argmax(1)
    mixed = u0 * (1 - mask) + u1 * mask
    ref_cps = F.cross_entropy(a(mixed), ps_b) + F.cross_entropy(b(mixed), ps_a)
    ref_sup = F.cross_entropy(a(img_l), label) + F.cross_entropy(b(img_l), label)
    torch.testing.assert_close(cps, ref_cps.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sup, ref_sup.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cutmix", [False, True])
def test_fused_upsample_step_equals_full_resolution_step(cutmix):
    """Decoder-resolution logits with the upsampling fused into the loss == upsample, then the loss."""
    torch.manual_seed(2)
    model = tiny_model().eval()
    img_l, u0, u1 = torch.randn(2, 3, 37, 41), torch.randn(2, 3, 37, 41), torch.randn(2, 3, 37, 41)
    label = torch.randint(0, 7, (2, 37, 41))
    label[:, :4] = 255
    mask = (torch.rand(2, 1, 37, 41) > 0.5).float()
    results = []
    for fused in (False, True):
        model.zero_grad()
        step = CPSStep(model, cutmix=cutmix, cps_weight=1.5, fused_upsample=fused)
        loss, sup, cps = step(img_l, label, u0, u1 if cutmix else None, mask if cutmix else None)
        loss.backward()
        results.append((loss.detach(), sup, cps, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, s0, c0, g0), (l1, s1, c1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_three_branch_cutmix_step_matches_ncps_formulation():
    """n-CPS with K = 3: each branch learns from the mean of CE against each other branch's mixed pseudo labels."""
    torch.manual_seed(3)
    model = CPSModel("resnet18", 7, 16, False, None, seeds=(0, 1, 2)).eval()
    assert [n for n, _ in model.named_children()] == ["branch_a", "branch_b", "branch_c"]
    step = CPSStep(model, cutmix=True, cps_weight=1.0)
    img_l, u0, u1 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 7, (2, 32, 32))
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss, sup, cps = step(img_l, label, u0, u1, mask)
    nets = model.branches
    mixed = u0 * (1 - mask) + u1 * mask
    with torch.no_grad():
        ps = [(n(u0) * (1 - mask) + n(u1) * mask).argmax(1) for n in nets]
        ref_cps = sum(F.cross_entropy(n(mixed), ps[j]) / 2 for k, n in enumerate(nets) for j in range(3) if j != k)
        ref_sup = sum(F.cross_entropy(n(img_l), label) for n in nets)
    torch.testing.assert_close(cps, ref_cps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sup, ref_sup, rtol=1e-4, atol=1e-5)
    assert not CPSStep(model, fused_upsample="auto").fused_upsample  # "auto": where it applies, two branches
    with pytest.raises(ValueError, match="fused_upsample=True: the upsample-fused loss takes two branches"):
        CPSStep(model, fused_upsample=True)


def test_three_branch_cutmix_ensemble_step_matches_formulation():
    """n-CPS ensemble labels with CutMix: branch k learns from the argmax of the other branches' mean
    softmax of the mixed teacher predictions (the teachers run on u0 and u1 apart, as in plain CutMix)."""
    torch.manual_seed(4)
    model = CPSModel("resnet18", 7, 16, False, None, seeds=(0, 1, 2)).eval()
    img_l, u0, u1 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 7, (2, 32, 32))
    label[:, :5] = 255
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss, sup, cps = CPSStep(model, cutmix=True, cps_weight=1.5, ncps_ensemble=True)(img_l, label, u0, u1, mask)
    _, _, cps_pairwise = CPSStep(model, cutmix=True, cps_weight=1.5)(img_l, label, u0, u1, mask)
    nets = model.branches
    mixed = u0 * (1 - mask) + u1 * mask
    with torch.no_grad():
        probs = [n(u0).softmax(1) * (1 - mask) + n(u1).softmax(1) * mask for n in nets]
        labels = [sum(p for j, p in enumerate(probs) if j != k).argmax(1) for k in range(3)]
        ref_cps = sum(F.cross_entropy(n(mixed), labels[k]) for k, n in enumerate(nets))
        ref_sup = sum(F.cross_entropy(n(img_l), label, ignore_index=255) for n in nets)
    torch.testing.assert_close(cps, ref_cps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sup, ref_sup, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.detach(), sup + 1.5 * cps)
    assert abs(cps.item() - cps_pairwise.item()) > 1e-3  # the ensemble labels are not the pairwise ones


@pytest.mark.parametrize("cutmix", [False, True])
def test_step_runs_branches_in_the_reference_order(cutmix):
    """The order of the passes decides BatchNorm's running statistics. Plain CPS: each branch on the
    labeled images, then the unlabeled (the reference's model(imgs, step=1), model(unsup_imgs, step=1),
    then step=2); CutMix: the teachers on u0 and u1, every student on the mixed images, then on the
    labeled. The branches' calls are recorded, and the running statistics after one training-mode step
    equal those of a copy run in the reference's order by hand."""
    torch.manual_seed(5)
    model, ref = tiny_model(), tiny_model()
    ref.load_state_dict(model.state_dict())
    img_l, u0, u1 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32) + 1, torch.randn(2, 3, 32, 32) - 1
    label = torch.randint(0, 7, (2, 32, 32))
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    calls = []
    hooks = [net.register_forward_pre_hook(lambda _, args, k=k: calls.append((k, args[0])))
             for k, net in enumerate(model.branches)]
    CPSStep(model, cutmix=cutmix, cps_weight=1.5)(img_l, label, u0, u1 if cutmix else None, mask if cutmix else None)
    for h in hooks:
        h.remove()
    mixed = u0 * (1 - mask) + u1 * mask
    if cutmix:
        order = [(0, u0), (0, u1), (1, u0), (1, u1), (0, mixed), (1, mixed), (0, img_l), (1, img_l)]
    else:
        order = [(0, img_l), (0, u0), (1, img_l), (1, u0)]
    assert [k for k, _ in calls] == [k for k, _ in order]
    assert all(torch.equal(x, want) for (_, x), (_, want) in zip(calls, order))
    with torch.no_grad():
        for k, x in order:
            ref.branches[k](x)
    for (name, got), want in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_step_draws_the_cutmix_boxes_from_its_generator():
    """Without a mask the step draws the boxes from ``mask_generator`` (the trainer's, checkpointed
    as rng "mask"), with the config's box count and area range: the same loss as the boxes drawn
    by hand from an equally seeded generator, and the generator moves on by one draw."""
    from cps_fast.data import box_masks

    torch.manual_seed(6)
    model = tiny_model().eval()
    img_l, u0, u1 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 7, (2, 32, 32))
    gen = torch.Generator().manual_seed(11)
    step = CPSStep(model, cutmix=True, cps_weight=1.0, cutmix_n_boxes=2, cutmix_prop_range=(0.3, 0.4),
                   mask_generator=gen)
    drawn = step(img_l, label, u0, u1)
    by_hand = torch.Generator().manual_seed(11)
    mask = box_masks(2, 32, 32, n_boxes=2, prop_range=(0.3, 0.4), generator=by_hand)
    assert 0 < float(mask.mean()) < 1
    for x, y in zip(drawn, step(img_l, label, u0, u1, mask)):
        assert torch.equal(x, y)
    assert torch.equal(gen.get_state(), by_hand.get_state())


@pytest.mark.parametrize("cutmix", [False, True])
def test_reference_step_equals_the_fused_step(cutmix):
    """The step benchmark's baseline (benchmarks/reference_step.py: argmax and four cross-entropies)
    computes the value of the fused step on full-resolution logits; it takes no fused upsampling."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from reference_step import ReferenceStep

    torch.manual_seed(7)
    model = tiny_model().eval()
    img_l, u0, u1 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    label = torch.randint(0, 7, (2, 32, 32))
    label[:, :4] = 255
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    args = (img_l, label, u0, u1 if cutmix else None, mask if cutmix else None)
    ref = ReferenceStep(model, cutmix=cutmix, cps_weight=1.5, fused_upsample="auto")
    assert not ref.fused_upsample
    fused = CPSStep(model, cutmix=cutmix, cps_weight=1.5, fused_upsample=False)
    for x, y in zip(ref(*args), fused(*args)):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fused_upsample=True.*not the reference code's"):
        ReferenceStep(model, fused_upsample=True)
    with pytest.raises(ValueError, match="two-branch"):
        ReferenceStep(CPSModel("resnet18", 7, 16, False, None, seeds=(0, 1, 2)))


@pytest.mark.parametrize("impl", ["fused", "foreach", "auto"])
def test_sgd_matches_torch_sgd(impl):
    torch.manual_seed(0)
    model = tiny_model()
    ref = tiny_model()
    ref.load_state_dict(model.state_dict())
    # eval mode: BatchNorm over 2 images (and 2 pooled values in ASPP) would amplify rounding chaotically
    model.eval()
    ref.eval()
    ours = SGD(param_groups(model, 1e-3), momentum=0.9, impl=impl)
    assert ours.impl in ("fused", "foreach")
    theirs = torch.optim.SGD([{"params": g["params"], "weight_decay": g["weight_decay"]}
                              for g in param_groups(ref, 1e-3)], lr=0.05, momentum=0.9)
    x = torch.randn(2, 3, 32, 32)
    for k in range(3):
        lr = 1e-3 * (1 - k / 10) ** 0.9  # small: a chaotic trajectory would amplify rounding
        ours.zero_grad()
        theirs.zero_grad()
        model(x).square().mean().backward()
        ref(x).square().mean().backward()
        ours.step(torch.tensor(lr))
        for g in theirs.param_groups:
            g["lr"] = lr
        theirs.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_sgd_refuses_unknown_and_removed_impls():
    with pytest.raises(ValueError, match="impl='apex' was removed.*use 'fused'"):
        SGD(param_groups(tiny_model(), 1e-3), impl="apex")
    with pytest.raises(ValueError, match="impl="):
        SGD(param_groups(tiny_model(), 1e-3), impl="adam")


def test_poly_lr():
    it = torch.tensor(25)
    assert abs(float(poly_lr(0.01, it, 100, 0.9)) - 0.01 * 0.75 ** 0.9) < 1e-9
    assert float(poly_lr(0.01, torch.tensor(100), 100)) == 0.0
    assert abs(float(poly_lr(0.01, torch.tensor(0), 100, warmup=10)) - 0.001) < 1e-9


def test_resume_is_bit_exact(tmp_path):
    """Plain CPS without loader workers, bit-exact on the CPU (on a GPU, interpolate's backward
    accumulates with atomics: not bitwise repeatable). CutMix with the default worker processes,
    across epoch boundaries and after signals: tests/test_resume.py."""
    cfg = tiny_cfg(cutmix=False, cps_weight=1.5, max_iters=5)
    straight = Trainer(cfg, tmp_path / "straight", device="cpu", print_fn=lambda *a: None)
    straight.train()
    Trainer(cfg, tmp_path / "split", max_iters=3, device="cpu", print_fn=lambda *a: None).train()
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    assert state["iteration"] == 3
    resumed = Trainer(cfg, tmp_path / "split", resume=True, device="cpu", print_fn=lambda *a: None)
    resumed.train()
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["iteration"] == b["iteration"] == cfg.max_iters
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after resume"
    for x, y in zip(sum(a["optimizer"]["buffers"], []), sum(b["optimizer"]["buffers"], [])):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-iteration run, shared by the tests that only read it (xdist_group: one worker)."""
    out = tmp_path_factory.mktemp("finished")
    Trainer(tiny_cfg(max_iters=2), out, print_fn=lambda *a: None).train()
    return out


@pytest.mark.xdist_group("finished_run")
def test_checkpoint_contents(finished_run):
    state = torch.load(finished_run / "last.pt", weights_only=True)
    assert state["model"]["branch_a.classifier.weight"].shape[0] == 7
    assert any(k.startswith("branch_b.") for k in state["model"])
    assert json.loads(state["config"])["max_iters"] == 2
    assert (finished_run / "best.pt").exists() and (finished_run / "config.json").exists()
    rows = [json.loads(line) for line in (finished_run / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("val/miou" in r for r in rows)
    assert not list(finished_run.glob(".last.pt.*"))  # no temporary file left behind
    assert not (finished_run / "profile").exists()  # no profile unless asked (tests/test_profiling.py)


@pytest.mark.xdist_group("finished_run")
def test_resume_refuses_a_different_config(finished_run):
    assert tiny_cfg().cutmix  # the run's
    with pytest.raises(ValueError, match="cutmix=True but the config has False"):
        Trainer(tiny_cfg(cutmix=False), finished_run, resume=True, print_fn=lambda *a: None)


def test_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="nope.pth"):
        Trainer(tiny_cfg(pretrained="nope.pth"), tmp_path, print_fn=lambda *a: None)


def test_non_finite_loss_is_reported(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration"):
        Trainer(tiny_cfg(lr=1e6, max_iters=6), tmp_path, print_fn=lambda *a: None).train()


def test_cli_train_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    cli_main(["train", "demo", "--out", str(out), "--iters", "2", "--device", "cpu", *sum((["--set", s] for s in TINY_SET), [])])
    assert (out / "last.pt").exists()
    cli_main(["eval", str(out / "last.pt"), "--device", "cpu", "--set", "eval_max_items=3"])
    assert "mIoU" in capsys.readouterr().out
    from PIL import Image

    from cps_fast.data import open_dataset

    item = open_dataset("synthetic", "seed=0,n=4,size=40", "val")[0]
    img_path = tmp_path / "x.png"
    Image.fromarray(item["image"]).save(img_path)
    cli_main(["predict", str(out / "last.pt"), str(img_path), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    mask = Image.open(tmp_path / "pred" / "x_mask.png")
    assert mask.mode == "P" and mask.size == (40, 40)
    assert (tmp_path / "pred" / "x_overlay.png").exists()


def test_cli_override_errors(tmp_path):
    from cps_fast.config import ConfigError

    with pytest.raises(ConfigError, match="cps_wieght"):
        cli_main(["train", "demo", "--out", str(tmp_path), "--set", "cps_wieght=2"])
    with pytest.raises(ConfigError, match="crop_size"):
        cli_main(["train", "demo", "--out", str(tmp_path), "--set", "crop_size=big"])


def test_demo_writes_its_summary(tmp_path):
    from cps_fast.train.demo import demo_main

    class Args:
        out = str(tmp_path)
        iters = 2
        device = "cpu"
        overrides = [s for s in TINY_SET if not s.startswith("max_iters")]
        branches = "2,3"

    summary = demo_main(Args)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {"supervised_miou", "cps_miou", "ncps3_miou"} <= set(saved) and saved["cps_miou"] == summary["cps_miou"]
    assert set(saved["run_seconds"]) == {"supervised", "cps", "ncps3"}
    assert (tmp_path / "ncps3" / "last.pt").exists()
    assert (tmp_path / "curves.png").exists() and (tmp_path / "predictions.png").exists()


def test_bench_loss_smoke(tmp_path):
    cli_main(["bench", "loss", "--device", "cpu", "--shape", "1,5,9,11", "--providers", "eager,torch",
                     "--dtypes", "fp32", "--reps", "1", "--json", str(tmp_path / "l.json")])
    saved = json.loads((tmp_path / "l.json").read_text())
    assert {r["provider"] for r in saved} == {"eager", "torch"}
    assert all(r["median_ms"] > 0 and r["device"] for r in saved)


def test_cli_bad_input_is_a_message_and_status_2(tmp_path, capsys, monkeypatch):
    from cps_fast.cli import main
    from cps_fast.config import ConfigError
    from cps_fast.data.datasets import DataError

    with pytest.raises(SystemExit) as e:
        main(["train", "demo", "--out", str(tmp_path), "--set", "no_such_key=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("cps-fast: error: ") and "no_such_key" in err, err
    with pytest.raises(SystemExit) as e:
        main(["train", "voc_r50_1-8", "--out", str(tmp_path), "--data-root", str(tmp_path / "none"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("cps-fast: error: ") and "Traceback" not in err, err
    monkeypatch.setenv("CPS_FAST_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="no_such_key"):
        main(["train", "demo", "--out", str(tmp_path), "--set", "no_such_key=1"])
    with pytest.raises(DataError):
        main(["train", "voc_r50_1-8", "--out", str(tmp_path), "--data-root", str(tmp_path / "none"), "--device", "cpu"])


def test_bench_lists_every_script():
    """`cps-fast bench X` takes every benchmarks/bench_X.py, and the README's command line names them all."""
    from cps_fast.cli import BENCHMARKS

    root = Path(__file__).resolve().parent.parent
    scripts = {p.stem[len("bench_"):] for p in (root / "benchmarks").glob("bench_*.py")}
    assert set(BENCHMARKS) == scripts
    line = next(ln for ln in (root / "README.md").read_text().splitlines() if ln.startswith("cps-fast bench "))
    assert set(line.split()[2].split("|")) == scripts, line


def test_bench_upsample_and_ncps_smoke(tmp_path):
    cli_main(["bench", "upsample", "--device", "cpu", "--shape", "1,3,5,6,17,23", "--providers",
              "fused,unfused,fused[scalar]", "--reps", "1", "--layouts", "nchw", "--json", str(tmp_path / "u.json")])
    saved = json.loads((tmp_path / "u.json").read_text())
    assert {r["provider"] for r in saved} >= {"fused", "unfused"}
    assert all(r["median_ms"] > 0 and r["shape"] == [1, 3, 5, 6] and r["size"] == [17, 23] for r in saved)
    cli_main(["bench", "ncps", "--device", "cpu", "--shape", "1,5,9,11", "--ks", "3", "--providers", "eager,torch",
              "--dtypes", "fp32", "--reps", "1", "--layouts", "nchw", "--json", str(tmp_path / "n.json")])
    saved = json.loads((tmp_path / "n.json").read_text())
    assert {(r["provider"], r["K"]) for r in saved} == {("eager", 3), ("torch", 3)}


def test_torchrun_two_processes_gloo(tmp_path):
    """DDP over two processes, for CPS and for supervised-only, which trains branch a alone (the
    others are frozen, so DDP needs no unused-parameter search, which would not survive CUDA-graph
    capture). One torchrun launch runs both (tests/torchrun_runs.py: cps-fast train's main twice)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sets = TINY_SET + ["batch_size_labeled=4", "batch_size_unlabeled=4", "profile_start=1"]
    runs = {m: tmp_path / m for m in ("cps", "supervised")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(Path(__file__).with_name("torchrun_runs.py")), *(f"{out}={m}" for m, out in runs.items()), "--",
           "--iters", "3", "--device", "cpu", "--profile", "1", *sum((["--set", s] for s in sets), [])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("x 2") == 2  # "device cpu x 2", once per run
    for method, out in runs.items():
        state = load_checkpoint(out / "last.pt")
        assert state["iteration"] == 3 and json.loads(state["config"])["method"] == method
        # each rank profiles its own second iteration; only rank 0 prints
        for r in (0, 1):
            assert json.loads((out / "profile" / f"summary_rank{r}.json").read_text())["iterations"] == 1, (method, r)
    assert res.stdout.count("profile (torch, cpu, rank") == 2  # rank 0's, once per run


# ----------------------------------------------------------------------------- GPU tests' setting


def _gpu_cfg(**kw):
    """The GPU tests' small run (tests/test_gpu_step.py, tests/test_profiling.py)."""
    base = dict(amp="bf16", cuda_graph=True, channels_last=True, cutmix=True, cps_weight=1.0,
                data_root="seed=0,n=64,size=96", crop_size=64, batch_size_labeled=4, batch_size_unlabeled=4,
                max_iters=24)
    return tiny_cfg(**{**base, **kw})


def test_bench_step_smoke(tmp_path):
    rows = cli_main(["bench", "step", "--device", "cpu", "--iters", "1", "--warmup", "1", "--images", "8",
                     "--variants", "reference,+fused_loss", "--set", "crop_size=48", "--json", str(tmp_path / "s.json"),
                     "--trace", str(tmp_path / "traces"), "--trace-variants", "+fused_loss", "--trace-iters", "2"])
    assert [r["variant"] for r in rows] == ["reference", "+fused_loss"]
    assert all(r["images_per_s"] > 0 for r in rows)
    for r in rows:  # the breakdown: the step's own loss call re-timed, and the data pipeline's share
        assert r["loss_ms"] > 0 and 0 < r["loss_fraction"] < 1, r
        assert r["step_fixed_batch_ms"] > 0 and r["data_ms"] >= 0 and 0 <= r["data_fraction"] < 1, r
    assert [r["loss_call"] for r in rows] == ["_reference_loss", "_cross"]
    # --trace: only the variant asked, two more iterations under torch.profiler, summary in the row
    assert "profile" not in rows[0] and not (tmp_path / "traces" / "reference").exists()
    prof = rows[1]["profile"]
    assert prof["wall_ms"] > 0 and set(prof["phases_ms"]) >= {"data", "step"} and prof["host_ops"]
    assert (tmp_path / "traces" / "+fused_loss" / "trace_rank0.json").is_file()
    summary = json.loads((tmp_path / "traces" / "+fused_loss" / "summary_rank0.json").read_text())
    assert summary["iterations"] == 2


def test_bench_step_cityscapes_preset_reads_cityscapes_pngs(tmp_path):
    rows = cli_main(["bench", "step", "--device", "cpu", "--preset", "cityscapes_r50_1-8", "--iters", "1",
                     "--warmup", "1", "--images", "4", "--variants", "reference", "--no-breakdown",
                     "--set", "crop_size=48", "--json", str(tmp_path / "s.json")])
    assert [r["variant"] for r in rows] == ["reference"] and rows[0]["images_per_s"] > 0
    assert rows[0]["dataset"] == "cityscapes"  # the synthetic PNGs in the Cityscapes layout, not VOC JPEGs


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
def test_train_on_voc_files(tmp_path, backend):
    """The trainer on a VOC folder (JPEGs + palette PNGs) through each data backend, with CutMix."""
    from cps_fast.data import write_voc

    root = tmp_path / "voc"
    write_voc(str(root), n_train=12, n_val=3, size=(48, 56), seed=1, label_format="palette")
    cfg = tiny_cfg(dataset="voc", data_root=str(root), num_classes=21, partition="1/3", cutmix=True,
                   cps_weight=1.0, data_backend=backend, max_iters=3, eval_crop_size=48)
    result = Trainer(cfg, tmp_path / "run", print_fn=lambda *a: None).train()
    assert 0.0 <= result["miou"] <= 100.0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 3
