"""A run is never lost or silently spoiled, and each user error is one line with exit status 2
(issue 21): through the real command, `cps_fast.cli.main`, on the demo's synthetic data."""
import json
import os
import pickle

import pytest
import torch

from cps_fast.cli import main
from cps_fast.config import RUN_KEYS, Config, load_preset, recipe_differences
from cps_fast.train import load_checkpoint
from helpers import user_error

pytestmark = pytest.mark.xdist_group("run_safety")  # its module fixture runs once (tests/conftest.py)

SETS = ["data_root=seed=0,n=6,size=40", "crop_size=24", "batch_size_labeled=2", "batch_size_unlabeled=2",
        "max_iters=4", "eval_max_items=1", "eval_crop_size=40", "eval_batch_size=1", "log_every=1",
        "num_workers=0", "head_channels=16", "backbone=resnet18"]
OPTS = [w for s in SETS for w in ("--set", s)]


def train(out, *extra):
    main(["train", "demo", "--out", str(out), "--device", "cpu", *OPTS, *extra])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-iteration run (of a 4-iteration schedule) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run")
    train(out, "--iters", "2")
    return out


def test_an_old_run_is_refused_without_resume_and_replaced_with_overwrite(tmp_path, capsys):
    out = tmp_path / "r"
    train(out, "--iters", "1")
    rows = (out / "log.jsonl").read_text().splitlines()
    err = user_error(capsys, ["train", "demo", "--out", str(out), "--device", "cpu", *OPTS, "--iters", "1"],
                     out, "--resume", "--overwrite", "last.pt", "log.jsonl")
    assert "holds a run" in err
    assert (out / "log.jsonl").read_text().splitlines() == rows  # nothing touched
    user_error(capsys, ["train", "demo", "--out", str(out), "--device", "cpu", *OPTS, "--resume", "--overwrite"],
               "--resume and --overwrite")
    train(out, "--iters", "1", "--overwrite")
    new = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert len(new) == len(rows) and [r.get("iter") for r in new if "loss" in r] == [1]  # not appended
    assert [r["iter"] for r in new if "val/miou" in r] == [1]  # validation rows carry their iteration
    assert "removed" in capsys.readouterr().out
    user_error(capsys, ["train", "demo", "--out", str(tmp_path / "empty"), "--device", "cpu", *OPTS, "--resume"],
               tmp_path / "empty" / "last.pt", "does not exist")


def test_resume_refuses_a_changed_recipe_and_allows_run_keys(run_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    err = user_error(capsys, ["train", "demo", "--out", str(out), "--device", "cpu", *OPTS, "--resume",
                         "--set", "lr=0.5", "--set", "crop_size=16"], "lr=", "crop_size=24", "16")
    assert "recipe" in err
    user_error(capsys, ["train", "demo", "--out", str(out), "--device", "cpu", *OPTS, "--resume",
                   "--set", "max_iters=8"], "max_iters=4")
    before = load_checkpoint(out / "last.pt")["iteration"]
    train(out, "--resume", "--iters", "3", "--set", "log_every=2", "--set", "eval_max_items=2")
    assert before == 2 and load_checkpoint(out / "last.pt")["iteration"] == 3
    user_error(capsys, ["train", "demo", "--out", str(out), "--device", "cpu", *OPTS, "--resume", "--iters", "3"],
               "--iters 3", "already at iteration 3")


def test_recipe_differences_compare_every_key_but_the_run_keys():
    cfg = load_preset("voc_r50_1-8")
    saved = cfg.to_dict()
    assert recipe_differences(saved, cfg) == []
    moved = dict(saved, data_root="/elsewhere", num_workers=1, eval_scales=[0.5, 1.0],
                 train_labeled=f"/elsewhere/{os.path.basename(saved['train_labeled'] or 'x.txt')}")
    assert recipe_differences(moved, cfg.replace(train_labeled=moved["train_labeled"].replace("/elsewhere", "/here"))
                              if saved["train_labeled"] else cfg) == []
    other = load_preset("voc_r50_1-2").to_dict()
    assert set(recipe_differences(other, cfg)) >= {"partition"}
    assert RUN_KEYS <= {f for f in Config.__dataclass_fields__}


def test_iters_must_be_positive(tmp_path, capsys):
    for n in ("0", "-5"):
        user_error(capsys, ["train", "demo", "--out", str(tmp_path / n), "--device", "cpu", *OPTS, "--iters", n],
                   f"--iters {n}", "positive")
        assert not (tmp_path / n / "last.pt").exists()


def test_a_finished_run_points_at_eval(tmp_path, capsys):
    out = tmp_path / "done"
    train(out, "--set", "max_iters=1")
    user_error(capsys, ["train", "demo", "--out", str(out), "--device", "cpu", *OPTS, "--set", "max_iters=1",
                   "--resume"], "finished its schedule", "cps-fast eval")


@pytest.mark.parametrize("kind", ["truncated", "empty", "pickled code", "foreign", "a folder"])
def test_bad_checkpoints_are_one_line_for_resume_eval_and_predict(run_dir, tmp_path, capsys, kind):
    out = tmp_path / "r"
    out.mkdir()
    bad = out / "last.pt"
    if kind == "truncated":
        bad.write_bytes((run_dir / "last.pt").read_bytes()[:4096])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "pickled code":
        bad.write_bytes(pickle.dumps({"model": os.system}))
    elif kind == "foreign":
        torch.save({"state_dict": torch.zeros(2)}, bad)
    else:
        bad.mkdir()
    expect = {"truncated": "truncated", "empty": "empty", "pickled code": "refuses", "foreign": "cps-fast",
              "a folder": "not a file"}[kind]
    (tmp_path / "x.png").write_bytes(b"")  # never read: the checkpoint fails first
    for argv in (["train", "demo", "--out", str(out), "--device", "cpu", *OPTS, "--resume"],
                 ["eval", str(bad), "--device", "cpu"],
                 ["predict", str(bad), str(tmp_path / "x.png"), "--out", str(tmp_path / "p"), "--device", "cpu"]):
        user_error(capsys, argv, bad, expect)


def test_best_pt_holds_no_optimiser_state(run_dir):
    best, last = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert "optimizer" not in best and "scaler" not in best and last["optimizer"]["buffers"]
    assert best["model"].keys() == last["model"].keys()


def test_config_json_trains_again_and_print_config(run_dir, tmp_path, capsys):
    capsys.readouterr()
    main(["train", str(run_dir / "config.json"), "--out", str(tmp_path / "again"), "--print-config",
          "--set", "lr=0.02"])
    printed = capsys.readouterr().out
    assert "lr" in printed and "0.02" in printed and not (tmp_path / "again").exists()
    main(["train", str(run_dir / "config.json"), "--out", str(tmp_path / "again"), "--device", "cpu", "--iters", "1"])
    assert load_checkpoint(tmp_path / "again" / "last.pt")["iteration"] == 1
    saved, again = (json.loads((d / "config.json").read_text()) for d in (run_dir, tmp_path / "again"))
    assert saved == again


def test_setting_errors_are_one_line(tmp_path, capsys):
    base = ["train", "demo", "--out", str(tmp_path / "x"), "--device", "cpu", *OPTS]
    user_error(capsys, base + ["--set", "lr=inf"], "'lr'", "finite")
    user_error(capsys, base + ["--set", "cps_weight=-1"], "cps_weight", ">= 0")
    user_error(capsys, base + ["--set", "mean=0.5,0.5"], "mean", "3 comma-separated")
    user_error(capsys, base + ["--set", "checkpoint_minutes=-1"], "checkpoint_minutes")
    err = user_error(capsys, base + ["--set", "lr_rate=1"], "lr_rate", "cps-fast presets --keys")
    assert "format_config" not in err
    user_error(capsys, base + ["--set", "pretrained=nope.pth"], "nope.pth", "weights_dir")
    user_error(capsys, base + ["--set", "pretrained=r.pth", "--set", f"weights_dir={tmp_path / 'none'}"],
               tmp_path / "none" / "r.pth")
    if not torch.cuda.is_available():
        user_error(capsys, base[:5] + ["cuda", *OPTS], "--device cuda", "no CUDA device")
        user_error(capsys, base + ["--data-backend", "dali-gpu"], "dali-gpu", "CUDA device")
    capsys.readouterr()
    main(["presets", "--keys"])
    keys = capsys.readouterr().out
    assert all(f"  {k} = " in keys for k in ("lr", "checkpoint_minutes", "cps_weight", "data_root"))


def test_checkpoints_by_count_and_by_time(tmp_path, monkeypatch):
    from cps_fast.train import Trainer
    from cps_fast.train import trainer as trainer_mod

    from cps_fast.config import apply_overrides

    cfg = apply_overrides(load_preset("demo"), SETS + ["checkpoint_every=0", "checkpoint_minutes=1"])
    assert Config().checkpoint_every == 1000 and Config().checkpoint_minutes == 30
    saved = []
    t = Trainer(cfg, tmp_path / "t", device="cpu", print_fn=lambda *a: None)
    real_save = t._save
    monkeypatch.setattr(t, "_save", lambda it, name="last.pt": (saved.append((it, name)), real_save(it, name)))
    clock = iter([0.0, 30.0, 61.0, 62.0, 125.0, 126.0, 200.0, 300.0, 400.0])
    now = [0.0]

    def monotonic():
        now[0] = next(clock, now[0] + 100)
        return now[0]

    t._t_saved = 0.0
    monkeypatch.setattr(trainer_mod.time, "monotonic", monotonic)
    t.train()
    assert [s for s in saved if s[1] == "last.pt"][0][0] < cfg.max_iters  # a timed save mid-run
    assert load_checkpoint(tmp_path / "t" / "last.pt")["iteration"] == cfg.max_iters


def test_an_empty_validation_list_fails_before_training(tmp_path, capsys):
    from tests.test_layouts import write_voc_reference

    root = tmp_path / "pascal_voc"
    write_voc_reference(root, [f"a{i}" for i in range(4)], ["v0"])
    (root / "val.txt").write_text("")
    user_error(capsys, ["train", "voc_r50_1-8", "--out", str(tmp_path / "o"), "--data-root", str(root), "--device",
                   "cpu", "--set", "pretrained=None", "--set", "train_labeled=None", "--set", "train_unlabeled=None",
                   "--set", "partition=1/2"], "val")
    assert not (tmp_path / "o" / "last.pt").exists()


def test_overriding_crop_size_moves_the_evaluation_window(capsys):
    from cps_fast.config import apply_overrides

    for name, crop in (("voc_r50_1-8", 512), ("cityscapes_r101_1-2_cutmix", 800)):
        assert load_preset(name).eval_crop == crop
        assert apply_overrides(load_preset(name), ["crop_size=321"]).eval_crop == 321
        assert apply_overrides(load_preset(name), ["crop_size=321", "eval_crop_size=400"]).eval_crop == 400
    capsys.readouterr()
    main(["train", "voc_r50_1-8", "--set", "crop_size=321", "--print-config"])
    line = next(x for x in capsys.readouterr().out.splitlines() if " eval_crop_size " in x)
    assert line.endswith("= None  (crop_size: 321)"), line


def test_splits_and_a_runs_own_partition_agree_by_default(tmp_path, capsys):
    from cps_fast.config import apply_overrides
    from cps_fast.data import read_list
    from cps_fast.train.trainer import open_training_sets
    from tests.test_layouts import write_voc_reference

    root = tmp_path / "pascal_voc"
    ids = [f"a{i:02d}" for i in range(16)]
    write_voc_reference(root, ids, ["v0"], size=(8, 8))
    main(["splits", "voc", str(root), "--out", str(tmp_path / "lists"), "--partitions", "1/4"])
    main(["splits", "voc", str(root), "--out", str(tmp_path / "seed0"), "--partitions", "1/4", "--seed", "0"])
    written = {os.path.basename(e.image) for e in read_list(str(tmp_path / "lists" / "train_labeled_1-4.txt"))}
    other = {os.path.basename(e.image) for e in read_list(str(tmp_path / "seed0" / "train_labeled_1-4.txt"))}
    cfg = apply_overrides(load_preset("voc_r50_1-8"), [f"data_root={root}", "pretrained=None", "partition=1/4",
                                                       "train_labeled=None", "train_unlabeled=None"])
    lab, unl = open_training_sets(cfg)
    drawn = {os.path.basename(lab.paths(i)[0]) for i in range(len(lab))}
    assert len(drawn) == 4 and drawn == written and other != written  # the seed matters, and is the trainer's


def test_overlapping_lists_are_named_in_a_warning(tmp_path, capsys, caplog):
    from tests.test_layouts import write_voc_reference

    root = tmp_path / "pascal_voc"
    write_voc_reference(root, [f"a{i}" for i in range(6)], ["v0"], size=(8, 8))
    (root / "lab.txt").write_text("a0\na1\na2\n")
    (root / "unl.txt").write_text("a2\na3\na1\na4\n")
    (root / "val.txt").write_text("")  # stops the run in the constructor, after the lists were read
    user_error(capsys, ["train", "voc_r50_1-8", "--out", str(tmp_path / "o"), "--data-root", str(root), "--device",
                   "cpu", "--set", "pretrained=None", "--set", "train_labeled=lab.txt",
                   "--set", "train_unlabeled=unl.txt"], "val")
    warned = [r.getMessage() for r in caplog.records if "both the labeled and the unlabeled" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("warning: 2 images") and "a1" in warned[0], warned


def test_removed_and_inapplicable_settings_are_one_line(tmp_path, capsys):
    """`fused_upsample=true` where it cannot apply, and the removed `loss_backend=reference` and
    `optimizer_impl=apex`, are refused naming the key and what to do; `branches=3` alone resolves
    fused_upsample 'auto' to off, as it always did."""
    base = ["train", "demo", "--print-config", *OPTS]
    user_error(capsys, base + ["--set", "fused_upsample=true", "--set", "branches=3"],
               "'fused_upsample' = True", "two branches", "branches=3", "'auto' or false")
    user_error(capsys, base + ["--set", "fused_upsample=true", "--set", "loss_backend=cuda"],
               "'fused_upsample' = True", "loss_backend='cuda'")
    user_error(capsys, base + ["--set", "loss_backend=reference"], "'loss_backend' = 'reference' was removed",
               "cps-fast bench step --variants reference")
    user_error(capsys, base + ["--set", "optimizer_impl=apex"], "'optimizer_impl' = 'apex' was removed",
               "CUDA graph", "'fused'")
    capsys.readouterr()
    main(base + ["--set", "branches=3"])
    line = next(x for x in capsys.readouterr().out.splitlines() if " fused_upsample " in x)
    assert line.rstrip().endswith("= 'auto'"), line


def test_an_old_checkpoint_with_a_removed_value_is_one_line(run_dir, tmp_path, capsys):
    """A checkpoint written when loss_backend took 'reference' names itself and the key; one holding
    the old default fused_upsample=true (two branches) evaluates as before."""
    state = load_checkpoint(run_dir / "last.pt")
    cfg = json.loads(state["config"])
    assert cfg["fused_upsample"] == "auto"
    for name, change in (("ref.pt", {"loss_backend": "reference"}), ("old.pt", {"fused_upsample": True})):
        torch.save({**state, "config": json.dumps({**cfg, **change})}, tmp_path / name)
    user_error(capsys, ["eval", str(tmp_path / "ref.pt"), "--device", "cpu"], tmp_path / "ref.pt",
               "'loss_backend' = 'reference' was removed", "bench step")
    capsys.readouterr()
    main(["eval", str(tmp_path / "old.pt"), "--device", "cpu", "--json", str(tmp_path / "old.json")])
    assert "mIoU" in capsys.readouterr().out
