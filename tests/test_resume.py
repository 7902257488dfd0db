"""Resume with the default data loader (worker processes) is bit-exact, across epoch boundaries;
SIGINT / SIGTERM stop `cps-fast train` after a finished step with a loadable last.pt."""
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from cps_fast.cli import run as cli_main
from cps_fast.config import apply_overrides, load_preset
from cps_fast.data.splits import SampleSchedule
from cps_fast.data.torch_loader import _EpochBatches
from cps_fast.train import Trainer, load_checkpoint
from cps_fast.train.trainer import _StopSignals

pytestmark = pytest.mark.xdist_group("resume")  # its module fixture runs once (tests/conftest.py)

N = 5  # the schedule: epochs of 2 iterations (2 labeled, 4 unlabeled images), boundaries at 2 and 4
SETS = ["data_root=seed=0,n=6,size=48", "partition=1/4", "crop_size=32", "batch_size_labeled=2",
        "batch_size_unlabeled=2", "scales=0.75,1.0,1.25", f"max_iters={N}", "lr=0.01", "eval_every=0",
        "eval_crop_size=48", "eval_max_items=1", "eval_batch_size=1", "log_every=1", "num_workers=2",
        "data_backend=pytorch"]


def quiet(*a, **k):
    pass


def config():
    cfg = apply_overrides(load_preset("demo"), SETS)
    assert cfg.num_workers == 2 and cfg.cutmix  # the demo's defaults: worker processes, u0 and u1
    return cfg


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """last.pt of N iterations in one run, shared by the resume comparisons."""
    out = tmp_path_factory.mktemp("straight")
    trainer = Trainer(config(), out, device="cpu", print_fn=quiet)
    assert trainer.iters_per_epoch == 2
    trainer.train()
    return load_checkpoint(out / "last.pt")


def assert_same_state(a: dict, b: dict, how: str) -> None:
    assert a["iteration"] == b["iteration"] == N, how
    differ = [k for k, v in a["model"].items() if not torch.equal(v, b["model"][k])]
    assert not differ, f"{how}: {len(differ)} of {len(a['model'])} model tensors differ, e.g. {differ[:3]}"
    bufs_a, bufs_b = sum(a["optimizer"]["buffers"], []), sum(b["optimizer"]["buffers"], [])
    assert len(bufs_a) == len(bufs_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(bufs_a, bufs_b)), f"{how}: momentum buffers differ"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), f"{how}: torch RNG state differs"
    assert torch.equal(a["rng"]["mask"], b["rng"]["mask"]), f"{how}: CutMix generator state differs"


def test_epoch_batches_start_is_a_function_of_the_epoch():
    """A DataLoader with workers calls iter() on its batch sampler twice for the first epoch; the
    resume position must survive that and apply to its own epoch only."""
    sched = SampleSchedule(10, 2, seed=3)
    sampler = _EpochBatches(sched, start_epoch=4, start_batch=3)
    first = list(iter(sampler))
    assert first == list(iter(sampler)) == sched.epoch(4)[3:] and len(sampler) == 2
    sampler.epoch = 5
    assert list(iter(sampler)) == sched.epoch(5) and len(sampler) == 5
    with pytest.raises(ValueError, match="start_batch=5 is outside 0..4"):
        _EpochBatches(sched, start_batch=5)


def test_loader_workers_ignore_signals_and_are_closed_at_exit():
    """A terminal's Ctrl-C (or a scheduler's SIGTERM) reaches the workers too: they go on serving,
    and the loader's exit hook shuts them down (multiprocessing's own hook, SIGTERM then join,
    would wait forever)."""
    import time

    from cps_fast.data import labeled_loader, open_dataset
    from cps_fast.data.torch_loader import _close_loaders

    ds = open_dataset("synthetic", "seed=1,n=4,size=24", "train")
    loader = labeled_loader(ds, batch_size=2, crop_size=16, scales=(1.0,), backend="pytorch", num_workers=2)
    batches = iter(loader)
    next(batches), next(batches)  # one from each worker: both are past their init
    workers = loader._loader._iterator._workers
    for w in workers:
        os.kill(w.pid, signal.SIGINT)
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert all(w.is_alive() for w in workers)
    assert next(batches)["image"].shape == (2, 3, 16, 16)
    _close_loaders()
    for w in workers:
        w.join(timeout=20)
    assert not any(w.is_alive() for w in workers)


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with _StopSignals() as stop:
        assert stop.poll() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: no KeyboardInterrupt, the first one stays
        assert stop.poll() == signal.SIGTERM == stop.settle()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with pytest.raises(RuntimeError), _StopSignals():
        raise RuntimeError
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def _rank(rank: int, init: str, results) -> None:
    """One of two gloo ranks: a loop of 'steps' (each with its gradient all-reduce); rank 1 alone
    receives SIGTERM after step 3, and later SIGINT after the loop."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        with _StopSignals(2) as stop:
            step = 0
            while True:
                step += 1
                dist.all_reduce(torch.ones(1))
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                if stop.poll():
                    break
            stopped, got = step, stop.signum
            stop.barrier()
        with _StopSignals(2) as stop:
            for _ in range(2):
                stop.poll()
            if rank == 1:
                os.kill(os.getpid(), signal.SIGINT)
            settled = stop.settle()
        results.put((rank, stopped, got, settled))
    finally:
        dist.destroy_process_group()


def test_stop_signals_agree_across_ranks(tmp_path):
    """Under DDP one rank's signal stops every rank at the same step, one step later."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = sorted(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got == [(0, 4, 0, signal.SIGINT), (1, 4, signal.SIGTERM, signal.SIGINT)]


def test_resume_with_worker_processes_is_bit_exact(straight, tmp_path):
    """0 -> 1 (mid-epoch), 1 -> 4 (across the boundary at 2, to the one at 4), 4 -> N (from
    exactly an epoch's start), each run with 2 workers per loader, equals N in one run."""
    cfg = config()
    Trainer(cfg, tmp_path, device="cpu", max_iters=1, print_fn=quiet).train()
    Trainer(cfg, tmp_path, device="cpu", max_iters=4, resume=True, print_fn=quiet).train()
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 4
    Trainer(cfg, tmp_path, device="cpu", resume=True, print_fn=quiet).train()
    assert_same_state(straight, load_checkpoint(tmp_path / "last.pt"), "0 -> 1 -> 4 -> N")


def test_a_run_that_fails_stops_its_loader_workers(tmp_path, monkeypatch):
    """However a run ends, its loaders' workers stop with it: an exception's traceback keeps the
    run's frames (and so the loaders) alive, and their shutdown would otherwise come whenever
    garbage collection reaches them, joining each worker for up to 5 s in the middle of whatever
    the process does next."""
    import multiprocessing

    from cps_fast.data.torch_loader import _ours

    def fail(self, it, *args):
        raise FloatingPointError(f"stop at {it}")

    monkeypatch.setattr(Trainer, "_log", fail)
    with pytest.raises(FloatingPointError) as failed:
        Trainer(config(), tmp_path, device="cpu", print_fn=quiet).train()
    assert failed.traceback  # the frames are still referenced here
    assert not [p for p in multiprocessing.active_children() if _ours(p) and p.is_alive()]


def _train_until(argv: list[str], passed: int, signum: int) -> tuple[int, str]:
    """Run `cps-fast train` in its own process group, send ``signum`` to the group (as a terminal's
    Ctrl-C reaches the loader workers too) once it logged an iteration >= ``passed``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("CPS_FAST_TRACEBACK", None)
    proc = subprocess.Popen([sys.executable, "-m", "cps_fast.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"\] (\d+)/\d+ loss", line)
            if m and int(m.group(1)) >= passed:
                os.killpg(proc.pid, signum)
                break
        lines.append(proc.communicate(timeout=300)[0])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(lines)


def _interrupted_at(output: str, out) -> tuple[int, list[str]]:
    m = re.search(rf"interrupted at iteration (\d+): saved {re.escape(str(out / 'last.pt'))}; "
                  rf"continue with: (cps-fast train demo --out {re.escape(str(out))} .* --resume)\n", output)
    assert m, output[-3000:]
    return int(m.group(1)), shlex.split(m.group(2))[1:]


def test_sigint_then_sigterm_save_last_pt_and_resume_bit_exact(straight, tmp_path, monkeypatch, capsys):
    """`cps-fast train` stopped by Ctrl-C (exit 130), then the command it printed, stopped by
    SIGTERM (exit 143; sent in this process, to save a second start-up), then that command again
    to the end: the same state as N iterations straight."""
    from cps_fast.cli import main

    out = tmp_path / "run"
    argv = ["train", "demo", "--out", str(out), "--device", "cpu", *sum((["--set", s] for s in SETS), [])]
    rc, output = _train_until(argv, 1, signal.SIGINT)
    assert rc == 130 and "Traceback" not in output, output[-3000:]
    m1, resume_argv = _interrupted_at(output, out)
    state = torch.load(out / "last.pt", weights_only=True)
    assert 1 <= m1 == state["iteration"] < N - 1, m1  # the signal came right after iteration 1's line
    assert not list(out.glob(".last.pt.*"))  # no temporary file left behind

    log = Trainer._log

    def log_then_sigterm(self, it, *args):
        log(self, it, *args)
        if it == m1 + 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_log", log_then_sigterm)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(resume_argv)
    output = capsys.readouterr().out
    assert stopped.value.code == 143
    assert f"resumed from {out / 'last.pt'} at iteration {m1}" in output
    m2, again = _interrupted_at(output, out)
    assert again == resume_argv and m2 == m1 + 1 == load_checkpoint(out / "last.pt")["iteration"]
    monkeypatch.undo()

    cli_main(resume_argv)
    assert_same_state(straight, load_checkpoint(out / "last.pt"), f"0 -> {m1} (SIGINT) -> {m2} (SIGTERM) -> N")


def test_workers_that_outlive_an_orderly_shutdown_are_killed_at_exit(monkeypatch):
    """A worker that does not stop when asked (torch's fallback is SIGTERM, which ours ignore)
    would make multiprocessing's exit hook wait forever: the loaders' exit hook kills it."""
    from cps_fast.data import labeled_loader, open_dataset
    from cps_fast.data.torch_loader import _close_loaders

    ds = open_dataset("synthetic", "seed=1,n=4,size=24", "train")
    loader = labeled_loader(ds, batch_size=2, crop_size=16, scales=(1.0,), backend="pytorch", num_workers=2)
    batches = iter(loader)
    next(batches)
    it = loader._loader._iterator
    workers = list(it._workers)
    monkeypatch.setattr(type(it), "_shutdown_workers", lambda self: None)  # asked to stop, they go on
    _close_loaders()
    assert not any(w.is_alive() for w in workers)
