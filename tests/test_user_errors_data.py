"""Bad input to eval, predict, bench, splits and the data loaders: one line, exit status 2 (issue 21).

Each case goes through ``cps_fast.cli.main`` in process and checks the exit status, that stderr is
one line ``cps-fast: error: ...`` naming the culprit, and that there is no traceback.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cps_fast.cli import main
from cps_fast.data.datasets import DataError
from helpers import user_error

pytestmark = pytest.mark.xdist_group("user_errors_data")  # its module fixture runs once (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent
DATA = "seed=0,n=6,size=48"
TINY = ["--set", f"data_root={DATA}", "--set", "crop_size=32", "--set", "batch_size_labeled=2",
        "--set", "batch_size_unlabeled=2", "--set", "partition=1/4", "--set", "eval_every=0",
        "--set", "eval_crop_size=48", "--set", "eval_max_items=2", "--set", "eval_batch_size=2",
        "--set", "num_workers=0", "--set", "data_backend=pytorch", "--set", "scales=1.0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of a one-iteration demo run (built once for the module)."""
    out = tmp_path_factory.mktemp("run")
    main(["train", "demo", "--out", str(out), "--iters", "1", "--device", "cpu", *TINY])
    return out / "last.pt"


def image_file(path: Path, seed=0, size=(40, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("scales", ["abc", "0", "-1", "1.0,", "1.0,nan"])
def test_eval_scales(ckpt, capsys, scales):
    user_error(capsys, ["eval", str(ckpt), "--device", "cpu", f"--scales={scales}"], "--scales", "positive")


def test_eval_json_path(ckpt, tmp_path, capsys, monkeypatch):
    from cps_fast.train import run

    # --json into a missing folder, or naming a folder: refused before the checkpoint is read
    user_error(capsys, ["eval", str(tmp_path / "nothing.pt"), "--json", str(tmp_path / "no" / "r.json")],
               "--json", str(tmp_path / "no"))
    user_error(capsys, ["eval", str(tmp_path / "nothing.pt"), "--json", str(tmp_path)], "--json", "folder")
    # --json PATH: written there, not beside the checkpoint
    target = tmp_path / "r.json"
    main(["eval", str(ckpt), "--device", "cpu", "--json", str(target)])
    assert json.loads(target.read_text())["ckpt"] == str(ckpt)
    assert not ckpt.with_suffix(".eval-val.json").exists()
    # the checkpoint's folder not writable (simulated: the tests may run as root, whom chmod does not
    # stop): a one-line note naming --json before evaluating, then the mIoU, exit 0, no JSON
    probe = run._writable_dir
    monkeypatch.setattr(run, "_writable_dir", lambda d: Path(d) != ckpt.parent and probe(d))
    capsys.readouterr()
    main(["eval", str(ckpt), "--device", "cpu"])  # exit status 0
    cap = capsys.readouterr()
    note = cap.err.strip().splitlines()
    assert len(note) == 1 and "--json" in note[0] and str(ckpt.parent) in note[0], cap.err
    assert "mIoU" in cap.out and not ckpt.with_suffix(".eval-val.json").exists()


def test_writable_dir_probe(tmp_path):
    from cps_fast.train.run import _writable_dir

    assert _writable_dir(tmp_path) and not list(tmp_path.iterdir())  # the probe file is removed
    assert not _writable_dir(tmp_path / "missing")
    if os.geteuid() != 0:  # root writes into a 0o555 folder
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert not _writable_dir(ro)


# ----------------------------------------------------------------------------- predict


def test_predict_out_checked_before_any_work(tmp_path, capsys):
    img = image_file(tmp_path / "a.png")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    # the checkpoint does not even exist: --out is checked first
    user_error(capsys, ["predict", str(tmp_path / "nothing.pt"), str(img), "--out", str(a_file)], "--out", str(a_file))
    user_error(capsys, ["predict", str(tmp_path / "nothing.pt"), str(img), "--out", str(a_file / "sub")], "--out")


def test_predict_inputs(tmp_path, capsys):
    none = str(tmp_path / "nothing.pt")
    user_error(capsys, ["predict", none, str(tmp_path / "missing.png"), "--out", str(tmp_path / "p")], "missing.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    user_error(capsys, ["predict", none, str(tmp_path / "empty"), "--out", str(tmp_path / "p")], "empty", ".png")
    a, b = image_file(tmp_path / "d1" / "x.png"), image_file(tmp_path / "d2" / "x.jpg", seed=1)
    user_error(capsys, ["predict", none, str(a), str(b), "--out", str(tmp_path / "p")], str(a), str(b), "x_mask.png")


def test_predict_folder(ckpt, tmp_path, capsys):
    folder = tmp_path / "imgs"
    for name in ("b.JPG", "a.png", "c.jpeg"):
        image_file(folder / name, seed=len(name))
    (folder / "readme.txt").write_text("skipped")
    capsys.readouterr()
    main(["predict", str(ckpt), str(folder), str(folder / "a.png"), "--out", str(tmp_path / "p"), "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(" -> ")[0] for ln in out] == [str(folder / n) for n in ("a.png", "b.JPG", "c.jpeg")]
    for stem in "abc":
        assert Image.open(tmp_path / "p" / f"{stem}_mask.png").size == (36, 40)


# ----------------------------------------------------------------------------- data errors in loader workers


def _voc(root: Path, n=4):
    from cps_fast.data.synthetic import write_voc

    write_voc(str(root), n_train=n, n_val=1, size=32)
    return root


@pytest.mark.parametrize("fault", ["corrupt image", "missing label", "label out of range", "size mismatch"])
def test_torch_loader_worker_data_error_is_itself(tmp_path, fault):
    from cps_fast.data import labeled_loader, open_dataset

    root = _voc(tmp_path / "voc")
    ds = open_dataset("voc", str(root), "train")
    img, lab = ds.paths(1)
    if fault == "corrupt image":
        Path(img).write_bytes(Path(img).read_bytes()[:100])
        culprit = img
    elif fault == "missing label":
        os.remove(lab)
        culprit = lab
    elif fault == "label out of range":
        arr = np.array(Image.open(lab))
        arr[0, 0] = 99
        Image.fromarray(arr).save(lab)
        culprit = os.path.basename(lab)
    else:
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(lab)
        culprit = lab
    loader = labeled_loader(ds, batch_size=2, crop_size=16, backend="pytorch", scales=(1.0,), num_workers=2)
    try:
        with pytest.raises(DataError) as e:
            list(loader.epoch_batches(0))  # the first epoch's batches hold every image
    finally:
        loader.close()
    msg = str(e.value)
    assert culprit in msg and "\n" not in msg and "DataLoader worker" not in msg and "Traceback" not in msg, msg


def test_train_worker_data_error_is_one_line(tmp_path, capsys):
    root = _voc(tmp_path / "voc", n=4)
    img = sorted((root / "JPEGImages").glob("*.jpg"))[0]
    img.write_bytes(b"not a jpeg")
    sets = [v for k, v in zip(TINY[::2], TINY[1::2]) if not v.startswith(("data_root=", "num_workers=", "partition="))]
    sets += ["dataset=voc", f"data_root={root}", "num_classes=21", "num_workers=2", "partition=2"]
    user_error(capsys, ["train", "demo", "--out", str(tmp_path / "run"), "--iters", "1", "--device", "cpu",
                *sum((["--set", v] for v in sets), [])], img.name)


def test_train_dali_decoder_error_names_the_file(tmp_path, capsys):
    """dali-cpu through the command: a JPEG whose header reads but whose scan is gone gets past the
    size check and fails in DALI's decoder, whose error names no file; the message does."""
    pytest.importorskip("nvidia.dali")
    root = _voc(tmp_path / "voc", n=4)
    img = sorted((root / "JPEGImages").glob("*.jpg"))[1]
    data = img.read_bytes()
    img.write_bytes(data[:data.find(b"\xff\xda")] + b"\xff\xd9")  # start of scan -> end of image
    sets = [v for k, v in zip(TINY[::2], TINY[1::2]) if not v.startswith(("data_root=", "data_backend=", "partition="))]
    sets += ["dataset=voc", f"data_root={root}", "num_classes=21", "data_backend=dali-cpu", "partition=2"]
    err = user_error(capsys, ["train", "demo", "--out", str(tmp_path / "run"), "--iters", "2", "--device", "cpu",
                      *sum((["--set", v] for v in sets), [])], "DALI", "decoders.image", str(img))
    others = [p for p in (root / "JPEGImages").glob("*.jpg") if p != img]
    assert not any(str(p) in err for p in others), err  # only the culprit, not the whole batch


def test_dali_source_names_the_batch(tmp_path):
    """dali-cpu's message names the batch's files when reading it fails (DALI itself not needed)."""
    from cps_fast.data import open_dataset
    from cps_fast.data.dali import DaliLoader, _Source
    from cps_fast.data.splits import SampleSchedule

    root = _voc(tmp_path / "voc")
    ds = open_dataset("voc", str(root), "train")
    src = _Source(ds, SampleSchedule(len(ds), 2, scales=(1.0,)), (16, 16), True, "bytes", "bytes", 0, two_pass=True)
    batch = src()  # a good batch
    assert len(batch[0]) == 2 and len(src.recent[-1]) == 2
    for i in range(len(ds)):
        os.remove(ds.paths(i)[0])
    with pytest.raises(DataError) as e:
        src()
    assert "[]" not in str(e.value) and any(ds.paths(i)[0] in str(e.value) for i in range(len(ds))), e.value

    class FailingPipe:
        def run(self):
            raise RuntimeError("nvjpeg: corrupt data\nmore")

    loader = DaliLoader.__new__(DaliLoader)
    loader.device, loader._source, loader._pipe = "cpu", src, FailingPipe()
    with pytest.raises(DataError) as e:
        loader._run()
    msg = str(e.value)
    assert "corrupt data" in msg and "[]" not in msg and ds.paths(0)[0].rsplit("/", 1)[0] in msg, msg


# ----------------------------------------------------------------------------- bench


@pytest.mark.parametrize("argv,name", [
    (["bench", "loss", "--shape", "2,21,64"], "--shape"),
    (["bench", "loss", "--shape", "2,21,x,64"], "--shape"),
    (["bench", "loss", "--shapes", "vocc"], "--shapes"),
    (["bench", "loss", "--dtypes", "fp8"], "--dtypes"),
    (["bench", "loss", "--layouts", "nhwc"], "--layouts"),
    (["bench", "loss", "--reps", "0"], "--reps"),
    (["bench", "loss", "--triton-configs", "64"], "--triton-configs"),
    (["bench", "ncps", "--shape", "1,5,9,11", "--ks", "1"], "--ks"),
    (["bench", "upsample", "--shape", "1,3,5,6"], "--shape"),
    (["bench", "model", "--shapes", "2x3x64"], "--shapes"),
    (["bench", "model", "--backbones", "resnet51"], "--backbones"),
    (["bench", "step", "--iters", "-1"], "--iters"),
    (["bench", "step", "--variants", "+cuda_grpah"], "--variants"),
    (["bench", "data", "--images", "0"], "--images"),
])
def test_bench_arguments(argv, name, capsys):
    user_error(capsys, [*argv, "--device", "cpu"] if argv[1] not in ("data",) else argv, name)


def test_bench_default_output_is_the_current_folder(tmp_path, monkeypatch, capsys):
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    monkeypatch.chdir(tmp_path)
    main(["bench", "loss", "--device", "cpu", "--shape", "1,5,9,11", "--providers", "torch", "--dtypes", "fp32",
          "--layouts", "nchw", "--modes", "fwd", "--reps", "1"])
    assert len(json.loads((tmp_path / "loss-cpu.json").read_text())) == 1
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.json")} == before
    import common  # benchmarks/, on sys.path once a bench ran

    assert common.result_path(None, "step", torch.device("cpu")) == tmp_path / "step-cpu.json"


def test_bench_scripts_default_outside_results():
    """No bench_*.py names benchmarks/results as its default output."""
    for script in (ROOT / "benchmarks").glob("bench_*.py"):
        text = script.read_text()
        assert "results" not in text and "RESULTS" not in text, script.name


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("value", ["0", "1/0", "2/1", "abc", "1.5", "100"])
def test_splits_partitions(tmp_path, capsys, value):
    root = _voc(tmp_path / "voc", n=6)
    err = user_error(capsys, ["splits", "voc", str(root), "--out", str(tmp_path / "lists"), "--partitions", "1/2", value], "--partitions", value)
    assert "k/n" in err or "labeled of the 6" in err
    assert not (tmp_path / "lists").exists()  # checked before writing any list


@pytest.mark.parametrize("value", ["abc", "2/1", "0"])
def test_partition_key(value):
    from cps_fast.config import ConfigError
    from cps_fast.data.splits import partition

    with pytest.raises(ConfigError, match=r"partition '.*': expected 'k/n' with 1 <= k <= n"):
        partition(6, value)
