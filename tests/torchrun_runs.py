"""Under torchrun: ``cps-fast train`` (its ``main``) once per ``OUT=METHOD`` argument, in order, in
the same two processes; the gloo process group that the first run starts serves the next ones.
tests/test_train.py's DDP test runs it: one launch (three Python start-ups) for both methods.

    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_runs.py OUT=METHOD... -- TRAIN_ARGS...
"""
import sys

from cps_fast.cli import main

if __name__ == "__main__":
    split = sys.argv.index("--")
    for spec in sys.argv[1:split]:
        out, method = spec.rsplit("=", 1)
        main(["train", "demo", "--out", out, *sys.argv[split + 1:], "--set", f"method={method}"])
