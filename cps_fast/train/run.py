"""Entry points of ``cps-fast train``, ``eval`` and ``predict``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import Config, apply_overrides, load_preset
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


def train_main(args) -> dict:
    cfg = config_from_args(args)
    trainer = Trainer(cfg, args.out, device=args.device, resume=args.resume, max_iters=args.iters)
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


def eval_main(args) -> dict:
    from ..eval import evaluate

    device = _device(args.device)
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    model, cfg = load_model(args.ckpt, device, overrides)
    scales = tuple(float(s) for s in args.scales.split(",")) if args.scales else cfg.eval_scales
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
    out = Path(args.ckpt).with_suffix(f".eval-{args.split}.json")
    out.write_text(json.dumps(result, indent=1))
    return result


def palette_of(cfg: Config) -> np.ndarray:
    from .. import data

    table = {"voc": data.VOC_PALETTE, "cityscapes": data.CITYSCAPES_PALETTE,
             "synthetic": data.SyntheticDataset.palette}[cfg.dataset]
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(table)] = np.asarray(table, np.uint8)
    return lut


def predict_main(args) -> list[str]:
    from ..data import read_image
    from ..eval import predict

    device = _device(args.device)
    model, cfg = load_model(args.ckpt, device)
    lut = palette_of(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in args.images:
        image = read_image(path)
        with torch.no_grad():
            pred = predict(lambda x: model(x), image, cfg.num_classes, crop_size=cfg.eval_crop,
                           stride_rate=cfg.eval_stride_rate, mean=cfg.mean, std=cfg.std, device=device)
        stem = Path(path).stem
        mask = Image.fromarray(pred.astype(np.uint8))  # mode L; putpalette makes it P, indices kept
        mask.putpalette(lut.reshape(-1).tolist())
        mask.save(out / f"{stem}_mask.png")
        overlay = (0.5 * image + 0.5 * lut[pred]).astype(np.uint8)
        Image.fromarray(overlay).save(out / f"{stem}_overlay.png")
        written += [str(out / f"{stem}_mask.png"), str(out / f"{stem}_overlay.png")]
        print(f"{path} -> {out / (stem + '_mask.png')}, {out / (stem + '_overlay.png')}")
    return written
