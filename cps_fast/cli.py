"""The ``cps-fast`` command.

    cps-fast demo --out DIR [--branches 2,3]   supervised vs CPS (and n-CPS, K=3) on synthetic data, on the CPU
    cps-fast train PRESET --out DIR [...]      train a preset (works under torchrun)
    cps-fast eval CKPT --data-root PATH        sliding-window mIoU of a checkpoint
    cps-fast predict CKPT IMAGES... --out DIR  coloured masks and overlays
    cps-fast bench {loss,upsample,ncps,model,data,step} ...  the benchmark scripts in benchmarks/
    cps-fast splits ...                        seeded labeled/unlabeled partitions
    cps-fast prepare {voc,cityscapes} ...      the presets' data folders from the official archives
    cps-fast presets                           the paper's presets, one line each
    cps-fast build-ext [--status]              compile the extension cps_fast._C into the cache (cps_fast.build)
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

BENCHMARKS = ("loss", "upsample", "ncps", "model", "data", "step")


def _benchmark_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not here.is_dir():
        raise SystemExit(
            f"cps-fast bench: the benchmark scripts live in the source checkout's benchmarks/ folder, "
            f"and {here} does not exist; install from a clone with `pip install --no-build-isolation -e .`"
        )
    return here


def run_benchmark(name: str, argv: list[str]):
    """Run ``benchmarks/bench_<name>.py``'s ``main(argv)``."""
    path = _benchmark_dir() / f"bench_{name}.py"
    if not path.exists():
        raise SystemExit(f"cps-fast bench: {path} does not exist")
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"cps_fast_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _cmd_bench(args, rest):
    return run_benchmark(args.what, rest)


def _cmd_splits(args, rest):
    from .data import splits

    splits.main(rest)


def _cmd_prepare(args, rest):
    from .data import prepare

    return prepare.main(rest)


def _cmd_presets(args, rest):
    from .config import keys_table, presets_table

    print(keys_table() if args.keys else presets_table())


def _cmd_train(args, rest):
    from .train.run import train_main

    if args.out is None and not args.print_config:
        args._parser.error("the following arguments are required: --out")
    train_main(args)


def _cmd_demo(args, rest):
    from .train.demo import demo_main

    demo_main(args)


def _cmd_build_ext(args, rest):
    from . import build

    code = build.main(rest, prog="cps-fast build-ext")
    if code:
        raise SystemExit(code)


def _cmd_eval(args, rest):
    from .train.run import eval_main

    eval_main(args)


def _cmd_predict(args, rest):
    from .train.run import predict_main

    predict_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cps-fast", description="Semi-supervised semantic segmentation with Cross Pseudo Supervision.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train supervised-only, CPS and n-CPS on synthetic data (CPU, minutes)")
    d.add_argument("--out", required=True, help="output folder (summary.json, plots, predictions; "
                   "a demo run again into it replaces the previous one)")
    d.add_argument("--iters", type=int, default=None, help="iterations per run (default: the demo preset's)")
    d.add_argument("--branches", default="2", help="CPS runs by branch count: '2' (default) or '2,3' to add "
                   "n-CPS with three branches (about 9 more minutes on 2 CPU cores)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train a preset")
    t.add_argument("preset", help="preset name (see docs/presets.md) or a path to a preset file")
    t.add_argument("--out", default=None, help="the run's folder (checkpoints, config.json, log.jsonl, tb/); "
                   "needed unless --print-config")
    t.add_argument("--data-root", default=None)
    t.add_argument("--iters", type=int, default=None, help="stop after N iterations (the LR schedule keeps the preset's length)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="OUT holds a run: start again from iteration 0 and replace it (checkpoints, log)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (preset, --set, the options above) and exit without training")
    t.add_argument("--data-backend", choices=("auto", "dali-gpu", "dali-cpu", "pytorch"), default=None)
    t.add_argument("--device", choices=("cuda", "cpu"), default=None)
    t.add_argument("--no-cuda-graph", action="store_true")
    t.add_argument("--compile", action="store_true", help="torch.compile the branches")
    t.add_argument("--profile", type=int, default=None, metavar="N",
                   help="record N iterations with torch.profiler (after profile_start, default 10) "
                        "into OUT/profile/ and print where the time went")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.set_defaults(func=_cmd_train, _parser=t)

    e = sub.add_parser("eval", help="evaluate a checkpoint (sliding window, branch a)")
    e.add_argument("ckpt")
    e.add_argument("--data-root", default=None)
    e.add_argument("--split", default="val")
    e.add_argument("--device", choices=("cuda", "cpu"), default=None)
    e.add_argument("--flip", action="store_true")
    e.add_argument("--scales", default=None, help="comma list of positive numbers, e.g. 0.75,1.0,1.25")
    e.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the result (default: CKPT.eval-SPLIT.json beside the checkpoint)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("predict", help="write coloured masks and overlays for images")
    pr.add_argument("ckpt")
    pr.add_argument("images", nargs="+", help="image files, or folders whose .jpg/.jpeg/.png images are "
                    "predicted (sorted); two images with the same file stem are refused")
    pr.add_argument("--out", required=True, help="folder for STEM_mask.png and STEM_overlay.png (created)")
    pr.add_argument("--device", choices=("cuda", "cpu"), default=None)
    pr.set_defaults(func=_cmd_predict)

    b = sub.add_parser("bench", help="run a benchmark script (further arguments go to it)")
    b.add_argument("what", choices=BENCHMARKS)
    b.set_defaults(func=_cmd_bench)

    s = sub.add_parser("splits", help="write seeded labeled/unlabeled partitions (arguments go to it)")
    s.set_defaults(func=_cmd_splits)

    pp = sub.add_parser("prepare", help="write a preset's data folder from the official archives "
                        "(arguments go to it: cps-fast prepare voc --help)")
    pp.set_defaults(func=_cmd_prepare)

    ps = sub.add_parser("presets", help="list the presets: dataset, backbone, partition, CutMix, CPS weight, "
                        "crop, schedule, paper mIoU")
    ps.add_argument("--keys", action="store_true", help="list every config key (for --set) with its type, "
                    "default and help instead")
    ps.set_defaults(func=_cmd_presets)

    be = sub.add_parser("build-ext", help="compile the extension cps_fast._C from the installed sources into the "
                        "cache, where none is installed (python -m cps_fast.build; arguments go to it)")
    be.set_defaults(func=_cmd_build_ext)
    return p


def run(argv: list[str] | None = None):
    """Run a command line; returns what the subcommand returns (rows, metrics), for scripting."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # bench and splits pass everything after their name to the script's own parser
    if argv and argv[0] in ("bench", "splits", "prepare", "build-ext"):
        head = argv[:2] if argv[0] == "bench" else argv[:1]
        args = parser.parse_args(head)
        return args.func(args, argv[len(head):])
    args = parser.parse_args(argv)
    return args.func(args, [])


def main(argv: list[str] | None = None) -> None:
    """The console script: exit status 0 unless a command raises.

    Bad input (a config, data or weights file, a backend that cannot run) ends with its message
    and exit status 2, without a traceback (``CPS_FAST_TRACEBACK=1`` shows it); anything else raises.
    Ctrl-C (SIGINT) exits with status 130 without a traceback (``train`` first saves ``last.pt`` and
    prints how to resume); ``train`` stopped by SIGTERM exits with 143.
    """
    from .errors import UserError

    try:
        run(argv)
    except UserError as exc:
        if os.environ.get("CPS_FAST_TRACEBACK") == "1":
            raise
        print(f"cps-fast: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if os.environ.get("CPS_FAST_TRACEBACK") == "1":
            raise
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
