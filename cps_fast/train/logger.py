"""Run logging: a progress line with ETA, ``log.jsonl``, TensorBoard scalars and image grids."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunLogger:
    """Writes what a run reports; everything is a no-op on ranks other than 0."""

    def __init__(self, out: Path, *, enabled: bool = True, print_fn=print):
        self.out, self.enabled, self.print = Path(out), enabled, print_fn
        self.tb = None
        self._file = None

    def start(self, it: int, stop: int) -> None:
        self.t0, self.it0, self.stop = time.perf_counter(), it, stop
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
        except Exception as exc:  # tensorboard not installed
            self.print(f"TensorBoard logging off ({type(exc).__name__}: {exc}); log.jsonl has the scalars")

    def scalars(self, it: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"iter": int(it), **row}  # every row says its iteration (validation rows too)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "iter" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, it)
        if "loss" in row:
            done = (it - self.it0) / max(self.stop - self.it0, 1)
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (1 - done) if done > 0 else float("nan")
            bar = "#" * int(20 * it / max(self.stop, 1))
            self.print(f"[{bar:<20}] {it}/{self.stop} loss {row['loss']:.4f} (sup {row['sup']:.4f} "
                       f"cps {row['cps']:.4f}) lr {row['lr']:.2e} {row['images_per_s']:.1f} img/s "
                       f"ETA {_fmt_time(eta) if eta == eta else '?'}")

    @torch.no_grad()
    def images(self, it, model, dataset, cfg, device, memory_format, n: int = 4) -> None:
        """TensorBoard grid: input, label, branch a, branch b for the first ``n`` items."""
        if not self.enabled or self.tb is None or len(dataset) == 0:
            return
        palette = getattr(dataset, "palette", None)
        if palette is None:
            palette = [[i * 37 % 256] * 3 for i in range(256)]
        palette = np.asarray(palette, dtype=np.uint8)
        lut = np.zeros((256, 3), np.uint8)
        lut[: len(palette)] = palette[:256]
        mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
        was_training = model.training
        model.eval()
        rows = []
        for i in range(min(n, len(dataset))):
            item = dataset[i]
            img = torch.from_numpy(item["image"]).to(device).permute(2, 0, 1)[None].float() / 255
            x = ((img - mean) / std).contiguous(memory_format=memory_format)
            preds = [model(x, branch=b).argmax(1)[0].cpu().numpy().astype(np.uint8) for b in ("a", "b")]
            label = item["label"] if item["label"] is not None else np.full(preds[0].shape, 255, np.uint8)
            rows.append(np.concatenate([item["image"], lut[label], lut[preds[0]], lut[preds[1]]], axis=1))
        model.train(was_training)
        width = max(r.shape[1] for r in rows)
        grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
        self.tb.add_image("val/input_label_a_b", grid, it, dataformats="HWC")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.tb is not None:
            self.tb.close()
