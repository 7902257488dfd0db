"""Issue 6's targets, read off one run's benchmark JSON: met, missed, or not measured.

Every target compares numbers taken in the same run (benchmarks/run_gpu.sh writes them
into one folder, then merges them here into one file):

  loss       fused loss fwd+bwd, (8,21,512,512) and (8,19,800,800), bf16, both layouts:
             >= 85% of the copy bandwidth (8 bytes per element pair), >= 8x eager, >= 2x torch.compile
  step       full CPS + CutMix step, VOC R50 (the variant furthest up the ladder against "reference"):
             >= 4x images/s, loss + data <= 10% of the step, peak memory <= 60%
  data       the DALI GPU feed >= 2x the images/s the step consumes
  schedule   VOC R50 1/8 CutMix full schedule <= 1 hour at the measured step time (bench_step's
             schedule row, else the best row's median times its schedule_iterations)
  upsample   (issue 7) the upsample-fused loss >= 3x upsample + fused loss, with lower peak memory

    python benchmarks/targets.py DIR [--out merged.json] [--info key=value ...]
    python benchmarks/targets.py merged.json                 # a merged file again

DIR holds the run's <name>.json files (benchmark rows) and, from run_gpu.sh, steps.tsv
(each step's outcome), tests.xml (the JUnit report of run_tests.py or pytest) and env.txt; the merged file keeps
them all under "run". A <name>.json that does not read (a benchmark killed mid-write before
common.write_json became atomic, say) is skipped and named, in the output and under "run".
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402
from run_tests import summarise  # noqa: E402

LOSS_SHAPES = ("voc", "cityscapes")
STEP_PRESET = "voc_r50_1-8_cutmix"


def load(path: str | Path, skipped: list[str] | None = None) -> dict:
    """``{benchmark name: rows}`` from a folder of ``<name>.json`` files or from a merged file.

    In a folder, a file that is not readable JSON is left out, saying so on stderr and, when
    ``skipped`` is given, adding ``"<file>: <why>"`` to it: the other benchmarks' rows still count."""
    path = Path(path)
    if path.is_dir():
        results = {}
        for f in sorted(path.glob("*.json")):
            try:
                rows = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                why = f"{f.name}: not readable JSON ({type(exc).__name__}: {str(exc)[:100]})"
                print(f"targets: skipping {why}", file=sys.stderr)
                if skipped is not None:
                    skipped.append(why)
                continue
            if isinstance(rows, list):
                results[f.stem] = rows
        return results
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "results" not in data:
        raise SystemExit(f"targets: {path} is not a merged run file (a JSON object with 'results')")
    return data["results"]


def collect_run(folder: str | Path) -> dict:
    """The run's steps (last outcome of each), test summary and environment, from run_gpu.sh's folder."""
    folder = Path(folder)
    run = {}
    if (folder / "steps.tsv").exists():
        run["steps"] = {}
        for line in (folder / "steps.tsv").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:  # a line cut off by a kill is not an outcome
                run["steps"][parts[0]] = {"outcome": parts[1], "at": parts[2]}
    if (folder / "tests.xml").exists():
        run["tests"] = summarise(folder / "tests.xml")
        try:  # run_tests.py's merged report: each file's outcome (interrupted, not started, exit status)
            root = ET.parse(folder / "tests.xml").getroot()
            outcomes = {x.get("file"): x.get("outcome") for x in root.iter("testsuite") if x.get("file")}
            if outcomes:
                run["tests"]["files"] = outcomes
        except ET.ParseError:
            pass
    if (folder / "env.txt").exists():
        run["env"] = (folder / "env.txt").read_text()
    return run


def _row(target: str, case: str, value, goal: str, ok, note: str = "") -> dict:
    return {"target": target, "case": case, "value": value, "goal": goal,
            "met": None if value is None or ok is None else bool(ok), "note": note}


def _ok(rows):
    return [r for r in rows if "error" not in r]


def loss_targets(results: dict) -> list[dict]:
    rows = _ok(results.get("loss", []))
    tiles = _ok(results.get("loss-tiles", []))  # run_gpu.sh's sweep of tile configurations
    out = []
    for shape in LOSS_SHAPES:
        for layout in ("nchw", "channels_last"):
            case = f"{shape} bf16 {layout}"
            key = dict(shape_name=shape, dtype="bf16", layout=layout, mode="fwd+bwd")
            match = [r for r in rows if all(r.get(k) == v for k, v in key.items())]
            fused = next((r for r in match if r["provider"] == "triton"), None)
            eager = next((r for r in match if r["provider"] == "eager"), None)
            comp = next((r for r in match if r["provider"] == "compile"), None)
            swept = [r for r in tiles if all(r.get(k) == v for k, v in key.items())]
            best = min((r for r in match + swept if r["provider"].startswith("triton")),
                       key=lambda r: r["median_ms"], default=None)
            note = ""
            if best is not None and best["provider"] != "triton" and best.get("copy_fraction") is not None:
                note = f"fastest tile config {best['provider']}: {best['copy_fraction']:.2f} of copy"
            frac = fused.get("copy_fraction") if fused else None
            out.append(_row("loss: of copy bandwidth", case, frac, ">= 0.85", frac is not None and frac >= 0.85, note))
            x_eager = eager["median_ms"] / fused["median_ms"] if fused and eager else None
            out.append(_row("loss: x eager", case, x_eager, ">= 8", x_eager is not None and x_eager >= 8))
            x_comp = comp["median_ms"] / fused["median_ms"] if fused and comp else None
            out.append(_row("loss: x torch.compile", case, x_comp, ">= 2", x_comp is not None and x_comp >= 2))
    return out


def step_targets(results: dict) -> tuple[list[dict], dict | None]:
    # the targets are the VOC R50 1/8 CutMix step's; a run of another preset measures none of them
    rows = _ok([r for r in results.get("step", []) if "variant" in r and r["variant"] != "schedule_hours"
                and r.get("preset", STEP_PRESET) == STEP_PRESET])
    ref = next((r for r in rows if r["variant"] == "reference"), None)
    engine = [r for r in rows if not r["variant"].startswith("reference")]
    if engine and all("ladder_index" in r for r in engine):  # run in any order: the furthest up the ladder
        best = max(engine, key=lambda r: r["ladder_index"])
    else:  # rows without their place in the ladder were written in its order
        best = rows[-1] if rows and rows[-1]["variant"] != "reference" else None
    case = f"{best['variant']} vs reference" if best else "-"
    out = []
    x = best["images_per_s"] / ref["images_per_s"] if best and ref else None
    out.append(_row("step: x reference images/s", case, x, ">= 4", x is not None and x >= 4))
    share = best.get("loss_data_fraction") if best else None
    note = (f"loss {best['loss_ms']:.1f} ms + data {best['data_ms']:.1f} ms of {best['median_ms']:.1f} ms"
            if best and share is not None else "")
    out.append(_row("step: loss + data share", case, share, "<= 0.10", share is not None and share <= 0.10, note))
    mem = best["peak_mb"] / ref["peak_mb"] if best and ref and best.get("peak_mb") and ref.get("peak_mb") else None
    out.append(_row("step: peak memory of reference", case, mem, "<= 0.60", mem is not None and mem <= 0.60))
    hours, note = None, ""
    sched = next((r for r in results.get("step", []) if r.get("variant") == "schedule_hours"
                  and r.get("preset", STEP_PRESET) == STEP_PRESET), None)
    if sched and best:
        hours = next((p["hours"] for p in sched["presets"] if p["preset"] == STEP_PRESET), None)
    if hours is None and best and best.get("schedule_iterations") and best.get("median_ms"):
        # from the rows themselves when the benchmark was stopped before it wrote its schedule row
        hours = best["schedule_iterations"] * best["median_ms"] / 3.6e6
        note = f"{best['schedule_iterations']} iterations at {best['variant']}'s {best['median_ms']:.1f} ms"
    out.append(_row("schedule: VOC R50 1/8 CutMix hours", STEP_PRESET, hours, "<= 1", hours is not None and hours <= 1,
                    note))
    return out, best


def data_targets(results: dict, best_step: dict | None) -> list[dict]:
    rows = _ok(results.get("data", []))
    dali = next((r for r in rows if r.get("backend") == "dali-gpu" and r.get("setting") == "voc"), None)
    need = best_step["images_per_s"] if best_step else None
    x = dali["images_per_s"] / need if dali and need else None
    note = f"{dali['images_per_s']:.0f} images/s fed, {need:.0f} consumed" if x is not None else ""
    return [_row("data: DALI feed x step consumption", "voc dali-gpu", x, ">= 2", x is not None and x >= 2, note)]


def upsample_targets(results: dict) -> list[dict]:
    rows = _ok(results.get("upsample", []))
    out = []
    for r in rows:
        if r.get("provider") != "fused" or r.get("mode") != "fwd+bwd":
            continue
        case = f"{r['shape_name']} {r['dtype']} {r['layout']}"
        # from the rows themselves when the benchmark was stopped before it added the ratios
        u = next((v for v in rows if v.get("provider") == "unfused"
                  and all(v.get(k) == r.get(k) for k in ("shape_name", "dtype", "layout", "mode"))), None)
        x = r.get("speedup_vs_unfused")
        if x is None and u and r.get("median_ms"):
            x = u["median_ms"] / r["median_ms"]
        out.append(_row("upsample: x upsample + fused loss", case, x, ">= 3", x is not None and x >= 3))
        mem = r.get("memory_vs_unfused")
        if mem is None and u and r.get("peak_mb") and u.get("peak_mb"):
            mem = r["peak_mb"] / u["peak_mb"]
        out.append(_row("upsample: peak memory of unfused", case, mem, "< 1", mem is not None and mem < 1))
    return out


def evaluate(results: dict) -> list[dict]:
    step, best = step_targets(results)
    return loss_targets(results) + step + data_targets(results, best) + upsample_targets(results)


def print_targets(rows: list[dict]) -> None:
    shown = [dict(r, value=None if r["value"] is None else round(r["value"], 3),
                  met={True: "met", False: "MISSED", None: "not measured"}[r["met"]]) for r in rows]
    print_table(shown, [("target", "target", ""), ("case", "case", ""), ("value", "value", ""),
                        ("goal", "goal", ""), ("met", "", ""), ("note", "note", "")])
    counts = {k: sum(r["met"] is v for r in rows) for k, v in (("met", True), ("missed", False), ("unmeasured", None))}
    print(f"{counts['met']} met, {counts['missed']} missed, {counts['unmeasured']} not measured")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a folder of the run's <name>.json files, or a merged file")
    p.add_argument("--out", default=None, help="write the merged file (results, targets, run) here")
    p.add_argument("--info", action="append", default=[], metavar="KEY=VALUE", help="added to the merged 'run'")
    args = p.parse_args(argv)
    skipped = []
    results = load(args.path, skipped)
    rows = evaluate(results)
    env = next((r for rows_ in results.values() for r in rows_ if isinstance(r, dict) and "device" in r), {})
    print(f"targets (issues 6 and 7) on {env.get('device', 'an unknown device')}, torch {env.get('torch')}, "
          f"triton {env.get('triton')}")
    print_targets(rows)
    if args.out:
        run = collect_run(args.path) if Path(args.path).is_dir() else {}
        if skipped:
            run["unreadable"] = skipped
        run.update(kv.split("=", 1) for kv in args.info)
        merged = {"device": env.get("device"), "torch": env.get("torch"), "triton": env.get("triton"),
                  "cuda": env.get("cuda"), "run": run, "targets": rows, "results": results}
        out = Path(args.out)  # atomically, as the benchmarks' own files (common.write_json)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(merged, indent=1) + "\n")
        tmp.replace(out)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
