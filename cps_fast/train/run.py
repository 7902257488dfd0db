"""Entry points of ``cps-fast train``, ``eval`` and ``predict``."""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Config, ConfigError, apply_overrides, format_config, load_preset
from ..data.datasets import DataError
from ..models import CPSModel
from .checkpoint import load_checkpoint
from .trainer import AMP_DTYPES, Trainer, resolve_eval_list


def config_from_args(args) -> Config:
    """The preset with ``--set`` overrides, then the dedicated flags."""
    cfg = apply_overrides(load_preset(args.preset), args.overrides)
    changes = {}
    if getattr(args, "data_root", None):
        changes["data_root"] = args.data_root
    if getattr(args, "data_backend", None):
        changes["data_backend"] = args.data_backend
    if getattr(args, "no_cuda_graph", False):
        changes["cuda_graph"] = False
    if getattr(args, "compile", False):
        changes["compile"] = True
    if getattr(args, "profile", None) is not None:
        changes["profile_iters"] = args.profile
    return cfg.replace(**changes) if changes else cfg


def resume_command(args) -> str:
    """The ``cps-fast train`` command line that continues this run from ``OUT/last.pt``: the same
    preset, overrides and flags (``--profile`` aside), with ``--resume``."""
    words = ["cps-fast", "train", args.preset, "--out", str(args.out)]
    for flag, value in (("--data-root", getattr(args, "data_root", None)),
                        ("--data-backend", getattr(args, "data_backend", None)),
                        ("--device", getattr(args, "device", None)),
                        ("--iters", getattr(args, "iters", None))):
        if value is not None:
            words += [flag, str(value)]
    words += [flag for flag, on in (("--no-cuda-graph", getattr(args, "no_cuda_graph", False)),
                                    ("--compile", getattr(args, "compile", False))) if on]
    for item in getattr(args, "overrides", ()):
        words += ["--set", item]
    return shlex.join(words + ["--resume"])


def train_main(args) -> dict:
    cfg = config_from_args(args)
    if getattr(args, "print_config", False):
        print(format_config(cfg))
        return {}
    trainer = Trainer(cfg, args.out, device=args.device, resume=args.resume,
                      overwrite=getattr(args, "overwrite", False), max_iters=args.iters)
    trainer.resume_command = resume_command(args)  # printed if a signal stops the run
    return trainer.train()


def load_model(ckpt: str | os.PathLike, device, overrides=()) -> tuple[CPSModel, Config]:
    """The CPS model and the config stored in a checkpoint written by the trainer."""
    state = load_checkpoint(ckpt)
    cfg = apply_overrides(Config.from_dict(json.loads(state["config"]), source=str(ckpt)), overrides)
    model = CPSModel(cfg.backbone, cfg.num_classes, cfg.output_stride, cfg.deep_stem, None,
                     seeds=tuple(range(cfg.branches)), head_channels=cfg.head_channels)
    model.load_state_dict(state["model"])
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt).eval(), cfg


def _device(name):
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def parse_scales(text: str) -> tuple[float, ...]:
    """``--scales``: a comma list of positive numbers (``0.75,1.0,1.25``)."""
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        scales = ()
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ConfigError(f"--scales {text!r}: expected a comma list of positive numbers, e.g. 0.75,1.0,1.25")
    return scales


def _writable_dir(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (an existing directory), tried with a probe file:
    ``os.access`` says yes to root on a read-only mount."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".cps-fast-probe-"):
            return True
    except OSError:
        return False


def eval_json_path(args) -> Path | None:
    """Where ``eval`` writes its JSON, checked before evaluating: ``--json PATH`` (an error if it
    cannot be written), else ``CKPT.eval-SPLIT.json`` beside the checkpoint (``None``, with a note,
    when that folder is not writable)."""
    if getattr(args, "json", None):
        path = Path(args.json)
        if path.is_dir():
            raise ConfigError(f"--json {path} is a folder; expected the path of a JSON file to write")
        if not path.parent.is_dir():
            raise ConfigError(f"--json {path}: folder {path.parent} does not exist")
        if not _writable_dir(path.parent) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"--json {path} cannot be written (folder {path.parent} or the file is not writable)")
        return path
    path = Path(args.ckpt).with_suffix(f".eval-{args.split}.json")
    if not _writable_dir(path.parent) or (path.exists() and not os.access(path, os.W_OK)):
        print(f"cps-fast: note: {path.parent} is not writable, so {path.name} will not be written; "
              "pass --json PATH to write the result elsewhere", file=sys.stderr)
        return None
    return path


def eval_main(args) -> dict:
    """``cps-fast eval``: the mIoU of a checkpoint's branch a, printed and written as JSON
    (``--json PATH``, default ``CKPT.eval-SPLIT.json`` beside the checkpoint)."""
    from ..eval import evaluate

    scales = parse_scales(args.scales) if args.scales else None
    out = eval_json_path(args)
    device = _device(args.device)
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    model, cfg = load_model(args.ckpt, device, overrides)
    scales = scales or cfg.eval_scales
    from ..data import open_dataset

    if args.split == "val":
        cfg, note = resolve_eval_list(cfg)
        if note:
            print(note)
    val = open_dataset(cfg.dataset, cfg.data_root, args.split,
                       cfg.data_path(cfg.val_list) if args.split == "val" else None)
    with torch.no_grad():
        metrics = evaluate(lambda x: model(x), val, cfg.num_classes, crop_size=cfg.eval_crop,
                           stride_rate=cfg.eval_stride_rate, flip=args.flip or cfg.eval_flip, scales=scales,
                           mean=cfg.mean, std=cfg.std, device=device, ignore_index=cfg.ignore_index,
                           batch_size=cfg.eval_batch_size, autocast_dtype=AMP_DTYPES[cfg.amp] if device.type == "cuda" else None,
                           class_names=getattr(val, "class_names", None))
    print(metrics.table(getattr(val, "class_names", None)))
    miou = 100 * float(metrics["miou"])
    paper = f" (paper: {cfg.paper_miou:.2f})" if cfg.paper_miou else ""
    print(f"mIoU {miou:.2f}{paper} on {len(val)} images of {cfg.dataset} {args.split}")
    result = {"miou": miou, "pixel_acc": 100 * float(metrics["pixel_acc"]),
              "iou": [float(x) for x in metrics["iou"]], "split": args.split, "ckpt": str(args.ckpt)}
    if out is not None:
        try:
            out.write_text(json.dumps(result, indent=1))
        except OSError as e:  # checked above; a disk that filled up meanwhile
            raise ConfigError(f"could not write the evaluation JSON {out} ({e.strerror}); "
                              "the mIoU is printed above; choose another place with --json PATH") from None
        print(f"wrote {out}")
    return result


def palette_of(cfg: Config) -> np.ndarray:
    from .. import data

    table = {"voc": data.VOC_PALETTE, "cityscapes": data.CITYSCAPES_PALETTE,
             "synthetic": data.SyntheticDataset.palette}[cfg.dataset]
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(table)] = np.asarray(table, np.uint8)
    return lut


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def predict_inputs(paths) -> list[Path]:
    """The images ``predict`` reads: each file as given, each folder's ``*.jpg|*.jpeg|*.png``
    (any case, sorted; not recursive). A missing path, an empty folder or two images with the same
    file stem (their masks would have the same name in ``--out``) is an error naming them."""
    images = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"predict: folder {p} holds no .jpg, .jpeg or .png image")
            images += found
        elif p.is_file():
            images.append(p)
        else:
            raise DataError(f"predict: image file {p} does not exist")
    seen: dict[str, Path] = {}
    unique = []
    for p in images:
        first = seen.setdefault(p.stem, p)
        if first is not p:
            if first.resolve() == p.resolve():
                continue  # the same file named twice: predicted once
            raise DataError(f"predict: {first} and {p} would both write {p.stem}_mask.png in --out; "
                            "rename one or predict them into separate --out folders")
        unique.append(p)
    return unique


def predict_out_dir(out) -> Path:
    """``predict --out``: a folder (created if absent) where files can be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a folder for the masks and overlays")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not _writable_dir(out):
        raise ConfigError(f"--out {out} is not writable; expected a folder for the masks and overlays")
    return out


def predict_main(args) -> list[str]:
    """``cps-fast predict``: for each image (a folder stands for its .jpg/.jpeg/.png images),
    ``STEM_mask.png`` (class indices, palette) and ``STEM_overlay.png`` in ``--out``. Two images
    with the same stem are refused, naming both, rather than one overwriting the other."""
    from ..data import read_image
    from ..eval import predict

    images = predict_inputs(args.images)
    out = predict_out_dir(args.out)
    device = _device(args.device)
    model, cfg = load_model(args.ckpt, device)
    lut = palette_of(cfg)
    written = []
    for path in images:
        image = read_image(str(path))
        with torch.no_grad():
            pred = predict(lambda x: model(x), image, cfg.num_classes, crop_size=cfg.eval_crop,
                           stride_rate=cfg.eval_stride_rate, mean=cfg.mean, std=cfg.std, device=device)
        mask_path, overlay_path = out / f"{path.stem}_mask.png", out / f"{path.stem}_overlay.png"
        mask = Image.fromarray(pred.astype(np.uint8))  # mode L; putpalette makes it P, indices kept
        mask.putpalette(lut.reshape(-1).tolist())
        mask.save(mask_path)
        overlay = (0.5 * image + 0.5 * lut[pred]).astype(np.uint8)
        Image.fromarray(overlay).save(overlay_path)
        written += [str(mask_path), str(overlay_path)]
        print(f"{path} -> {mask_path}, {overlay_path}")
    return written
