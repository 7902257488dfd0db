"""Tests of cps_fast.config: presets, overrides, errors, round trips."""
import json
import re
from pathlib import Path

import pytest

from cps_fast.config import (
    Config, ConfigError, apply_overrides, format_config, keys_table, list_presets, load_config, load_preset,
    recipe_differences, save_config,
)

# Published mIoU (CPS paper, Tables 1-2), partitions 1/16, 1/8, 1/4, 1/2.
PAPER = {
    ("voc", "r50", False): (68.21, 73.20, 74.24, 75.91),
    ("voc", "r50", True): (71.98, 73.67, 74.90, 76.15),
    ("voc", "r101", False): (72.18, 75.83, 77.55, 78.64),
    ("voc", "r101", True): (74.48, 76.44, 77.68, 78.64),
    ("cityscapes", "r50", False): (69.79, 74.39, 76.85, 78.64),
    ("cityscapes", "r50", True): (74.47, 76.61, 77.83, 78.77),
    ("cityscapes", "r101", False): (70.50, 75.71, 77.41, 80.08),
    ("cityscapes", "r101", True): (74.72, 77.62, 79.21, 80.21),
}
EPOCHS = {"voc": (32, 34, 40, 60), "cityscapes": (128, 137, 160, 240)}
ROWS = [(ds, bb, cm, i, r) for (ds, bb, cm) in PAPER for i, r in enumerate((16, 8, 4, 2))]

# {name: load_preset(name).to_dict()} of all 33 presets, written from the 32 flat preset files and
# demo.py before the paper's rows became one table (cps_fast/configs/paper.py).
GOLDEN = json.loads((Path(__file__).parent / "golden" / "presets.json").read_text())
# keys that Config no longer has, with the only value they ever held in a preset
REMOVED = {"lr_scaling": "none", "lr_reference_batch": 8, "warmup_iters": 0}
# keys whose default changed since, (the golden value, today's): fused_upsample's old default True
# meant "where it applies", which is today's "auto" (true is now refused where it cannot apply)
CHANGED = {"fused_upsample": (True, "auto")}


def test_all_presets_listed():
    names = list_presets()
    assert "demo" in names
    assert len(names) == 33
    for ds, bb, cm, _, r in ROWS:
        assert f"{ds}_{bb}_1-{r}" + ("_cutmix" if cm else "") in names


@pytest.mark.parametrize("ds,bb,cm,i,r", ROWS, ids=lambda v: str(v))
def test_preset_matches_reference_table(ds, bb, cm, i, r):
    cfg = load_preset(f"{ds}_{bb}_1-{r}" + ("_cutmix" if cm else ""))
    voc = ds == "voc"
    assert cfg.dataset == ds
    assert cfg.num_classes == (21 if voc else 19)
    assert cfg.backbone == ("resnet50" if bb == "r50" else "resnet101")
    assert cfg.output_stride == 16 and cfg.deep_stem
    assert cfg.crop_size == cfg.eval_crop == (512 if voc else 800)
    assert (cfg.batch_size_labeled, cfg.batch_size_unlabeled) == (8, 8)
    assert cfg.epochs == EPOCHS[ds][i]
    assert cfg.cutmix is cm
    assert cfg.cps_weight == ({(True, False): 1.5, (True, True): 1.0, (False, False): 6.0, (False, True): 5.0}[voc, cm])
    assert cfg.sup_loss == ("ce" if voc else "ohem")
    assert (cfg.ohem_thresh, cfg.ohem_min_kept) == (0.7, 50000)
    assert (cfg.momentum, cfg.poly_power) == (0.9, 0.9)
    # reference lr/wd re-expressed for an undivided loss (docs/presets.md)
    assert cfg.lr == 0.0025
    assert cfg.weight_decay == pytest.approx(1e-4 * (4 if voc else 8))
    assert cfg.scales == (0.5, 0.75, 1.0, 1.5, 1.75, 2.0) and cfg.flip
    assert cfg.eval_stride_rate == pytest.approx(2 / 3) and cfg.eval_scales == (1.0,) and not cfg.eval_flip
    assert cfg.partition == f"1/{r}" and f"1-{r}.txt" in cfg.train_labeled and f"1-{r}.txt" in cfg.train_unlabeled
    assert cfg.paper_miou == PAPER[ds, bb, cm][i]


def test_presets_resolve_to_the_golden_file():
    assert sorted(GOLDEN) == list_presets()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_preset_matches_golden_key_by_key(name):
    golden, now = GOLDEN[name], load_preset(name).to_dict()
    assert set(golden) == set(now) | set(REMOVED), f"{name}: keys added {set(now) - set(golden)}, " \
                                                   f"removed {set(golden) - set(now) - set(REMOVED)}"
    for key, value in now.items():
        want = CHANGED[key][1] if key in CHANGED and golden[key] == CHANGED[key][0] else golden[key]
        assert (value, type(value)) == (want, type(want)), f"{name}: {key}"
    for key, default in REMOVED.items():
        assert golden[key] == default, f"{name}: removed key {key} held {golden[key]!r}"


def test_removed_keys_load_at_their_old_default(tmp_path):
    """A config.json or checkpoint written before lr_scaling, lr_reference_batch and warmup_iters
    were removed loads when they hold their defaults, and is refused, naming the key, otherwise."""
    old = GOLDEN["voc_r50_1-8_cutmix"]
    cfg = load_preset("voc_r50_1-8_cutmix").replace(fused_upsample=True)  # the old default, kept as written
    assert Config.from_dict(old) == cfg
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_config(tmp_path / "config.json") == cfg == load_preset(str(tmp_path / "config.json"))
    assert recipe_differences(old, cfg) == []
    for key, value in [("lr_scaling", "linear"), ("lr_reference_batch", 16), ("warmup_iters", 500),
                       ("warmup_iters", False)]:
        changed = {**old, key: value}
        with pytest.raises(ConfigError, match=rf"dict: config key '{key}' = {value!r} was removed.*old default"):
            Config.from_dict(changed)
        (tmp_path / "config.json").write_text(json.dumps(changed))
        with pytest.raises(ConfigError, match=rf"config.json.*'{key}'"):
            load_config(tmp_path / "config.json")
        with pytest.raises(ConfigError, match=rf"checkpoint's config: config key '{key}'"):
            recipe_differences(changed, cfg)
    with pytest.raises(ConfigError, match="unknown config key 'warmup_iters'"):
        apply_overrides(cfg, ["warmup_iters=0"])
    with pytest.raises(TypeError):
        Config(lr_scaling="none")


def test_preset_file_with_a_removed_key(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text("lr = 0.01\nwarmup_iters = 0\n")
    assert load_preset(str(mine)) == Config(name="mine", lr=0.01)
    mine.write_text("lr = 0.01\nlr_scaling = 'sqrt'\n")
    with pytest.raises(ConfigError, match=r"mine.py.*'lr_scaling' = 'sqrt' was removed"):
        load_preset(str(mine))


def test_table_module_is_not_a_preset():
    with pytest.raises(ConfigError, match="unknown preset 'paper'"):
        load_preset("paper")
    with pytest.raises(ConfigError, match="unknown preset 'voc_r50_1-3'.*did you mean"):
        load_preset("voc_r50_1-3")


def test_demo_preset_is_cpu_friendly():
    cfg = load_preset("demo")
    assert cfg.dataset == "synthetic" and cfg.backbone == "resnet18"
    assert cfg.amp in ("fp32", "bf16") and not cfg.cuda_graph and cfg.pretrained is None
    assert cfg.crop_size <= 128 and cfg.max_iters <= 500
    assert cfg.total_iters(64, 448) == cfg.max_iters


def test_iteration_rule_is_the_reference_floor():
    cfg = load_preset("voc_r50_1-8")
    # reference config: num_unsup = 10582 - 10582 // 8 = 9260 -> 9260 // 8 = 1157 iterations
    assert cfg.iters_per_epoch_for(1322, 9260) == 1157
    assert cfg.total_iters(1322, 9260) == 34 * 1157
    assert cfg.replace(iters_per_epoch=10).total_iters(1, 1) == 340
    assert cfg.replace(method="supervised").iters_per_epoch_for(1322, 9260) == 1322 // 8


def test_per_rank_batch():
    cfg = Config()
    assert cfg.per_rank_batch(4) == (2, 2)
    with pytest.raises(ConfigError, match="batch_size_labeled.*8.*divisible.*3"):
        cfg.per_rank_batch(3)


def test_overrides_parse_types():
    cfg = apply_overrides(load_preset("voc_r50_1-8"), [
        "lr=0.01", "epochs=3", "cutmix=true", "flip=no", "eval_scales=0.75,1,1.25",
        "scales=[0.5, 1.0]", "pretrained=None", "data_root=/data/voc", "eval_stride_rate=1/2",
        "amp=fp16", "output_stride=8", "cutmix_prop_range=(0.1, 0.3)", "max_iters=null",
        "--cps_weight=2",
    ])
    assert cfg.lr == 0.01 and cfg.epochs == 3 and cfg.cutmix is True and cfg.flip is False
    assert cfg.eval_scales == (0.75, 1.0, 1.25) and cfg.scales == (0.5, 1.0)
    assert cfg.pretrained is None and cfg.data_root == "/data/voc"
    assert cfg.eval_stride_rate == 0.5 and cfg.amp == "fp16" and cfg.output_stride == 8
    assert cfg.cutmix_prop_range == (0.1, 0.3) and cfg.max_iters is None
    assert isinstance(cfg.cps_weight, float) and cfg.cps_weight == 2.0
    assert cfg.data_path(cfg.train_labeled) == "/data/voc/subset_train_aug/train_aug_labeled_1-8.txt"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'.*did you mean 'lr'|'learning_rat'"):
        apply_overrides(Config(), ["learning_rat=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'cps_wieght'; did you mean 'cps_weight'"):
        apply_overrides(Config(), ["cps_wieght=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(Config(), ["lr"])
    with pytest.raises(ConfigError, match="unknown preset 'voc_r50_1-9'.*did you mean"):
        load_preset("voc_r50_1-9")


@pytest.mark.parametrize("item,expected", [
    ("lr=fast", "lr expects a float, got 'fast'"),
    ("epochs=3.5", "epochs expects an int, got '3.5'"),
    ("cutmix=maybe", r"cutmix expects a bool \(true/false\), got 'maybe'"),
    ("amp=int8", "amp expects one of 'bf16', 'fp16', 'fp32', got 'int8'"),
    ("output_stride=32", "output_stride expects one of 8, 16, got '32'"),
    ("cutmix_prop_range=0.1", "cutmix_prop_range expects 2 comma-separated floats, got '0.1'"),
    ("crop_size=None", "crop_size expects an int, got 'None'"),
])
def test_wrong_type_errors_say_given_and_expected(item, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(Config(), [item])


def test_range_errors():
    with pytest.raises(ConfigError, match=r"'momentum' = 1.5: expected a value in \[0, 1\)"):
        apply_overrides(Config(), ["momentum=1.5"])
    with pytest.raises(ConfigError, match="'cutmix_prop_range'"):
        Config(cutmix_prop_range=(0.6, 0.2))
    with pytest.raises(ConfigError, match="'lr': expected a float, got 'x'"):
        Config(lr="x")
    with pytest.raises(TypeError):
        Config(nonexistent=1)


def test_preset_file_errors(tmp_path):
    bad = tmp_path / "mine.py"
    bad.write_text("import math\nlr = math.sqrt(4e-6)\nlearning_rate = 3\n")
    with pytest.raises(ConfigError, match=r"mine.py.*unknown config key 'learning_rate'"):
        load_preset(str(bad))
    bad.write_text("import math\nlr = math.sqrt(4e-6)\nepochs = 'ten'\n")
    with pytest.raises(ConfigError, match="mine.py.*'epochs': expected an int, got 'ten'"):
        load_preset(str(bad))
    bad.write_text("import math\nlr = math.sqrt(4e-6)\n")
    cfg = load_preset(str(bad))
    assert cfg.name == "mine" and cfg.lr == pytest.approx(2e-3)


def test_round_trip_dict_and_json(tmp_path):
    for name in ("cityscapes_r101_1-2_cutmix", "demo"):
        cfg = load_preset(name)
        d = cfg.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert Config.from_dict(d) == cfg
        save_config(cfg, tmp_path / name / "config.json")
        assert load_config(tmp_path / name / "config.json") == cfg
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        Config.from_dict({**cfg.to_dict(), "bogus": 1})


def test_format_config_marks_changes():
    text = format_config(apply_overrides(load_preset("voc_r50_1-16"), ["lr=0.01"]))
    assert "[optim]" in text
    line = next(l for l in text.splitlines() if l.strip("* ").startswith("lr "))
    assert line.lstrip().startswith("*") and "0.01" in line
    assert "paper_miou" in text and "68.21" in text


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]


def test_fused_upsample_is_auto_true_or_false(tmp_path):
    """'auto' (the default) turns the upsample-fused loss on where it applies; an explicit true is
    refused where it cannot apply, naming the key and why; a config written before 'auto' existed
    (true, the old default, meaning "where it applies") loads as it meant."""
    cfg = Config()
    assert cfg.fused_upsample == "auto" and apply_overrides(cfg, ["branches=3"]).fused_upsample == "auto"
    for text, value in [("auto", "auto"), ("'auto'", "auto"), ("true", True), ("yes", True), ("false", False),
                        ("0", False)]:
        got = apply_overrides(cfg, [f"fused_upsample={text}"]).fused_upsample
        assert (got, type(got)) == (value, type(value)), text
    assert apply_overrides(cfg, ["branches=3", "fused_upsample=false"]).fused_upsample is False
    with pytest.raises(ConfigError, match=r"fused_upsample expects 'auto' or a bool \(true/false\), got 'maybe'"):
        apply_overrides(cfg, ["fused_upsample=maybe"])
    with pytest.raises(ConfigError, match=r"'fused_upsample' = True: expected 'auto' or false.*two branches, "
                                          r"not branches=3"):
        apply_overrides(cfg, ["fused_upsample=true", "branches=3"])
    with pytest.raises(ConfigError, match=r"'fused_upsample' = True.*no 'cuda' backend"):
        Config(loss_backend="cuda", fused_upsample=True)
    with pytest.raises(ConfigError, match=r"'fused_upsample': expected 'auto' or a bool"):
        Config(fused_upsample="on")
    assert "fused_upsample = 'auto'  ('auto' or a bool (true/false))" in keys_table()
    line = next(ln for ln in format_config(apply_overrides(cfg, ["fused_upsample=false"])).splitlines()
                if "fused_upsample" in ln)
    assert line.lstrip().startswith("*") and line.rstrip().endswith("= False"), line
    for value in ("auto", True, False):  # each round-trips through config.json
        save_config(cfg.replace(fused_upsample=value), tmp_path / "config.json")
        assert load_config(tmp_path / "config.json").fused_upsample == value
    old = {**GOLDEN["demo"], "branches": 3}  # an n-CPS run's config.json of before: true, its default
    del old["lr_scaling"], old["lr_reference_batch"], old["warmup_iters"]
    assert old["fused_upsample"] is True and Config.from_dict(old).fused_upsample == "auto"
    assert Config.from_dict({**old, "branches": 2}).fused_upsample is True


@pytest.mark.parametrize("key,value,says", [
    ("loss_backend", "reference", "cps-fast bench step --variants reference"),
    ("optimizer_impl", "apex", "use 'auto' or 'fused'"),
])
def test_removed_values_are_refused_saying_what_instead(tmp_path, key, value, says):
    """Values that were removed (the reference loss went to the step benchmark, apex's SGD went)
    are refused wherever a config comes from: an override, a config.json, a checkpoint's dict."""
    with pytest.raises(ConfigError, match=rf"override '{key}={value}': config key '{key}' = '{value}' was "
                                          rf"removed from cps-fast \(.*{re.escape(says)}"):
        apply_overrides(Config(), [f"{key}={value}"])
    (tmp_path / "config.json").write_text(json.dumps({**Config().to_dict(), key: value}))
    with pytest.raises(ConfigError, match=rf"config.json: config key '{key}' = '{value}' was removed"):
        load_config(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=rf"'{key}' = '{value}' was removed"):
        Config(**{key: value})
