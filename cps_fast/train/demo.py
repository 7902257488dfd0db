"""``cps-fast demo``: supervised-only vs CPS (K = 2) vs n-CPS (K = 3) on the built-in
synthetic scenes, on the CPU.

Every run uses the same labeled split (the demo preset's partition of the
synthetic train set) and the same network; CPS adds the unlabeled rest. Writes
``OUT/summary.json`` (``supervised_miou``, ``cps_miou``, ``ncps3_miou``),
``OUT/curves.png`` (validation mIoU against iterations) and ``OUT/predictions.png``
(input, label and each run's prediction for a few validation images), plus each
run's folder. The K = 3 run is asked for with ``--branches 2,3`` (it adds about 9
minutes on a 2-core CPU, past the default demo's 10-minute budget).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..config import apply_overrides, load_preset
from .run import palette_of
from .trainer import Trainer, open_eval_set


def demo_main(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = apply_overrides(load_preset("demo"), args.overrides)
    if args.iters is not None:
        cfg = cfg.replace(max_iters=int(args.iters))
    branch_counts = sorted({int(k) for k in str(getattr(args, "branches", None) or "2").split(",")})
    if not branch_counts or branch_counts[0] != 2 or branch_counts[-1] > 8:
        raise SystemExit(f"cps-fast demo: --branches {args.branches!r}; expected 2 or 2,K with 2 < K <= 8")
    plan = [("supervised", dict(method="supervised"))]
    plan += [("cps" if k == 2 else f"ncps{k}", dict(method="cps", branches=k)) for k in branch_counts]
    t0 = time.perf_counter()
    runs = {}
    for name, change in plan:
        what = name if name != "cps" else "CPS (K = 2)"
        if name.startswith("ncps"):
            what = f"n-CPS (K = {change['branches']})"
        print(f"\n=== demo: {what} ({cfg.max_iters} iterations, {cfg.partition} of the synthetic set labeled) ===")
        trainer = Trainer(cfg.replace(**change, name=f"demo-{name}"), out / name, device=args.device,
                          overwrite=True, print_fn=_quiet_config_print)  # a demo again replaces the last one
        t_run = time.perf_counter()
        final = trainer.train()
        runs[name] = {"trainer": trainer, "final": final, "history": trainer.history,
                      "seconds": time.perf_counter() - t_run}
    seconds = time.perf_counter() - t0
    summary = {
        "supervised_miou": runs["supervised"]["final"]["miou"],
        "cps_miou": runs["cps"]["final"]["miou"],
        "gain": runs["cps"]["final"]["miou"] - runs["supervised"]["final"]["miou"],
        **{f"{name}_miou": r["final"]["miou"] for name, r in runs.items() if name.startswith("ncps")},
        "run_seconds": {name: r["seconds"] for name, r in runs.items()},
        "iterations": cfg.max_iters,
        "partition": cfg.partition,
        "seconds": seconds,
        "device": str(runs["cps"]["trainer"].device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "history": {m: r["history"] for m, r in runs.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot_curves(summary["history"], out / "curves.png")
    _plot_predictions(cfg, {m: r["trainer"].model for m, r in runs.items()}, out / "predictions.png")
    extra = "".join(f"  n-CPS K={name[4:]} mIoU {r['final']['miou']:.2f}" for name, r in runs.items()
                    if name.startswith("ncps"))
    print(f"\nsupervised-only mIoU {summary['supervised_miou']:.2f}  CPS mIoU {summary['cps_miou']:.2f}  "
          f"(+{summary['gain']:.2f}){extra} in {seconds / 60:.1f} min; wrote {out / 'summary.json'}, "
          f"{out / 'curves.png'}, {out / 'predictions.png'}")
    return summary


def _quiet_config_print(*a, **k):
    text = " ".join(str(x) for x in a)
    if not text.startswith("config "):  # the full config listing is in each run's config.json
        print(*a, **k)


def _plot_curves(history: dict, path: Path, size=(640, 400)) -> None:
    """A line chart of validation mIoU against iterations, drawn with PIL."""
    W, H = size
    left, right, top, bottom = 60, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(r["iter"], r["miou"]) for rows in history.values() for r in rows]
    if not pts:
        img.save(path)
        return
    xmax = max(p[0] for p in pts) or 1
    ymax = max(10.0, min(100.0, 10 * np.ceil(max(p[1] for p in pts) / 10 + 0.5)))

    def xy(it, m):
        return left + (W - left - right) * it / xmax, H - bottom - (H - top - bottom) * m / ymax

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(0, int(ymax) + 1, 10):
        y = xy(0, k)[1]
        d.line([left - 4, y, left, y], fill="black")
        d.text((left - 30, y - 6), f"{k}", fill="black")
    d.text((W // 2 - 30, H - bottom + 24), "iteration", fill="black")
    d.text((5, top - 20), "val mIoU (%)", fill="black")
    colours = {"supervised": (200, 60, 60), "cps": (40, 90, 200), "ncps3": (30, 150, 60)}
    for k, (name, rows) in enumerate(history.items()):
        line = [xy(r["iter"], r["miou"]) for r in rows]
        colour = colours.get(name, (0, 0, 0))
        if len(line) > 1:
            d.line(line, fill=colour, width=3)
        for x, y in line:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.text((left + 10, top + 10 + 15 * k), f"{name}: {rows[-1]['miou']:.1f}" if rows else name, fill=colour)
    for it in sorted({r["iter"] for rows in history.values() for r in rows}):
        x = xy(it, 0)[0]
        d.line([x, H - bottom, x, H - bottom + 4], fill="black")
        d.text((x - 10, H - bottom + 6), f"{it}", fill="black")
    img.save(path)


@torch.no_grad()
def _plot_predictions(cfg, models: dict, path: Path, n: int = 4) -> None:
    """Rows of input | label | supervised | CPS for the first ``n`` validation images."""
    val = open_eval_set(cfg)
    lut = palette_of(cfg)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    rows = []
    for i in range(min(n, len(val))):
        item = val[i]
        x = (torch.from_numpy(item["image"]).permute(2, 0, 1)[None].float() / 255 - mean) / std
        cells = [item["image"], lut[item["label"]]]
        for model in models.values():
            p = next(model.parameters())
            model.eval()
            pred = model(x.to(p.device, memory_format=torch.channels_last)).argmax(1)[0].cpu().numpy()
            cells.append(lut[pred.astype(np.uint8)])
        rows.append(np.concatenate(cells, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    cell_w = grid.width // (2 + len(models))
    zoom = max(1, 256 // cell_w)  # small synthetic scenes are enlarged, pixels kept sharp
    grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST)
    out = Image.new("RGB", (grid.width, grid.height + 20), "white")
    out.paste(grid, (0, 20))
    d = ImageDraw.Draw(out)
    for k, title in enumerate(["input", "label", *models]):
        d.text((k * cell_w * zoom + 6, 4), title, fill="black")
    out.save(path)
