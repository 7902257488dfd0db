"""The GPU sessions' plans (benchmarks/gpu/plan.tsv for issue 19, plan-20.tsv for issue 20, run by
benchmarks/run_gpu.sh), the prebuilt extension that lets them skip compiling (setup.py's
CPS_FAST_PREBUILT, benchmarks/gpu/), and the DALI pack's installer and fat-binary pruner (issue 20).

A lent task has 15 device-minutes in all and one command may run 10 (../shared/GPU.md). The plan
must fit both with what the calls cost around them: the machine's start, the transfers, the
idle time between the calls and before give_back. Its numbers live in plan.tsv only; this reads
them, checks the arithmetic, and checks that run_gpu.sh walks exactly those steps and keeps to
them (PLAN=1, which runs nothing and needs neither torch nor a GPU).
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import check_prebuilt  # noqa: E402

PLAN = ROOT / "benchmarks" / "gpu" / "plan.tsv"
PLAN20 = ROOT / "benchmarks" / "gpu" / "plan-20.tsv"
PLANS = {19: PLAN, 20: PLAN20}  # run_gpu.sh's ISSUE=N
CARRY_LIMIT_MIB = 64  # the device tool's limit on one call's working tree and carried paths
RUN_GPU = ROOT / "benchmarks" / "run_gpu.sh"
SESSION_LIMIT_S = 14 * 60  # of the task's 15 device-minutes: the 15th is margin
CALL_MARGIN_S = 30  # a call's deadline under the command limit: the script's start, a killed step's 5 s grace
WARM_S = 30  # a machine stays warm (and billed) this long after a call, then goes back (device README)
# issue 19's caps for call 1's steps
ISSUE_CAPS = {"tests": 150, "loss": 130, "step": 200}
# what a fresh machine needs before the first measurement: the first cold `import torch` (CUDA 13
# build), triton and CUDA start-up; an install imports torch about 5 times and starts CUDA twice
FRESH_MACHINE_CAPS = {"env": 45, "install": 90}


def load_plan(path=PLAN) -> dict:
    """A plan file as ``{"session": {name: s}, "calls": {n: s}, "commands": {n: str}, "steps": [(call, name,
    min, max)], "repairs": {...}, "size": {name: MiB}, "carry": {n: [(path, MiB)]}}``."""
    plan = {"session": {}, "calls": {}, "commands": {}, "steps": [], "repairs": {}, "size": {}, "carry": {}}
    for line in Path(path).read_text().splitlines():
        cols = line.split()
        if not cols or cols[0].startswith("#"):
            continue
        kind = cols[0]
        if kind == "session":
            plan["session"][cols[1]] = int(cols[2])
        elif kind == "call":
            plan["calls"][int(cols[1])] = int(cols[2])
            plan["commands"][int(cols[1])] = " ".join(cols[3:])
        elif kind == "step":
            plan["steps"].append((cols[1], cols[2], int(cols[3]), int(cols[4])))
        elif kind == "repair":
            plan["repairs"][cols[1]] = (int(cols[2]), int(cols[3]))
        elif kind == "size":
            plan["size"][cols[1]] = int(cols[2])
        elif kind == "carry":
            plan["carry"].setdefault(int(cols[1]), []).append((cols[2], int(cols[3])))
        else:
            raise AssertionError(f"{path}: unknown row kind {kind!r} in {line!r}")
    return plan


def steps_of(plan, call) -> list[tuple[str, int, int]]:
    return [(name, lo, hi) for c, name, lo, hi in plan["steps"] if c == str(call)]


def walk(plan, call, elapsed=0) -> list[tuple[str, int | None]]:
    """The call as run_gpu.sh runs it, every step taking its whole grant: ``(name, seconds granted
    or None when skipped)``. An independent account of the script's rule: a step starts only
    while its minimum is left before the deadline less the finish, and gets at most its maximum."""
    clock, out = elapsed, []
    end = plan["calls"][call] - plan["session"]["finish"]
    for name, lo, hi in steps_of(plan, call):
        left = end - clock
        if left < lo:
            out.append((name, None))
            continue
        out.append((name, min(hi, left)))
        clock += min(hi, left)
    return out


def plan_mode(*, env=None, **kw):
    """``PLAN=1 bash benchmarks/run_gpu.sh`` with ``PY`` pointing nowhere: the plan needs no Python."""
    full = dict(os.environ, PLAN="1", PY="/nonexistent/python", **(env or {}))
    for key in ("CALL", "STEPS", "ELAPSED", "PLANFILE", "ISSUE"):
        if key not in (env or {}):
            full.pop(key, None)
    return subprocess.run(["bash", str(RUN_GPU)], env=full, capture_output=True, text=True, timeout=60, **kw)


# ----------------------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize("issue", sorted(PLANS))
def test_each_call_fits_one_command(issue):
    """A call's deadline and its transfers fit the 600 s a command may run, and in the worst case
    (each step running to its cap: caps are not reservations, a step gets what is left) every step
    still starts with its minimum, and the call ends by its deadline."""
    plan = load_plan(PLANS[issue])
    s = plan["session"]
    assert sorted(plan["calls"]) == [1, 2]
    for call, deadline in plan["calls"].items():
        steps = steps_of(plan, call)
        assert steps, f"call {call} has no step"
        assert deadline + s["transfer"] <= s["limit"] <= 600, f"call {call}: {deadline} s + transfers over {s['limit']} s"
        assert deadline + CALL_MARGIN_S <= s["limit"], f"call {call}: {deadline} s leaves no margin under {s['limit']} s"
        worst = walk(plan, call)
        for (name, lo, _), (_, granted) in zip(steps, worst):
            assert granted is not None and granted >= lo, f"call {call}: {name} gets {granted} s in the worst case, needs {lo} s"
        assert sum(t for _, t in worst) + s["finish"] <= deadline
        # no cap beyond what the step could ever be granted (every step before it at its minimum)
        for k, (name, _, hi) in enumerate(steps):
            most = deadline - s["finish"] - sum(lo for _, lo, _ in steps[:k])
            assert hi <= most, f"call {call}: {name}'s cap {hi} s is more than it can ever get ({most} s)"


@pytest.mark.parametrize("issue", sorted(PLANS))
def test_the_session_fits_14_device_minutes_with_the_start_and_transfers(issue):
    plan = load_plan(PLANS[issue])
    s = plan["session"]
    assert s["start"] >= 120 and s["transfer"] > 0 and 0 < s["between"] <= WARM_S
    # honest: billed until give_back lands, or the 30 s it stays warm; an earlier give_back is margin
    assert s["release"] >= WARM_S
    total = (s["start"] + sum(d + s["transfer"] for d in plan["calls"].values()) + s["between"] * (len(plan["calls"]) - 1)
             + s["release"])
    assert total <= s["device"] <= SESSION_LIMIT_S, f"the session needs {total} s of {s['device']} s"


def test_the_steps_are_the_issues():
    plan = load_plan()
    for call, name, lo, hi in plan["steps"]:
        assert 0 < lo <= hi, f"step {name} (call {call}): minimum {lo} s, maximum {hi} s"
    for name, (lo, hi) in plan["repairs"].items():
        assert 0 < lo <= hi, f"repair {name}: minimum {lo} s, maximum {hi} s"
    call1 = [n for n, _, _ in steps_of(plan, 1)]
    call2 = [n for n, _, _ in steps_of(plan, 2)]
    assert call1 == ["env", "install", "tests", "loss", "step"], call1  # the environment check first
    assert call2 == ["env", "tiles", "upsample", "ncps"], call2
    for name, cap in ISSUE_CAPS.items():
        assert dict((n, hi) for n, _, hi in steps_of(plan, 1))[name] <= cap, name
    for name, cap in FRESH_MACHINE_CAPS.items():  # call 1 runs on a fresh machine
        assert dict((n, hi) for n, _, hi in steps_of(plan, 1))[name] >= cap, name
        assert plan["repairs"].get(name, (0, cap))[1] >= cap, name  # a fresh machine in call 2 too
    assert "data" not in call1 + call2  # DALI is issue 20's: not in these two calls
    assert set(plan["repairs"]) == {"install", "build"}
    # every step of each call starts in the worst case (each one before it taking its whole maximum)
    for call in (1, 2):
        assert all(t is not None for _, t in walk(plan, call)), walk(plan, call)


# ----------------------------------------------------------------------------- the script keeps to it


def script_steps() -> list[tuple[str, str, str]]:
    """run_gpu.sh's ``step`` and ``repair`` lines as ``(kind, name, command)``, continuation lines joined."""
    text = RUN_GPU.read_text().replace("\\\n", " ")
    return [(kind, name, cmd.strip()) for kind, name, cmd in re.findall(r"^\s*(step|repair) (\w+) (.*)$", text, flags=re.M)]


def test_run_gpu_sh_runs_the_planned_steps_in_order():
    """The script runs its steps in one fixed order; each plan's calls (and its STEPS-only steps)
    take theirs in that order, and every step of the script is some plan's."""
    script = RUN_GPU.read_text()
    calls = script_steps()
    ran = [name for kind, name, _ in calls if kind == "step"]
    assert len(ran) == len(set(ran)), ran
    planned = set()
    for issue, path in PLANS.items():
        plan = load_plan(path)
        for call in [*map(str, plan["calls"]), "-"]:
            names = [n for c, n, _, _ in plan["steps"] if c == call]
            missing = [n for n in names if n not in ran]
            assert not missing, f"{path.name} call {call}: run_gpu.sh has no step {missing}"
            where = [ran.index(n) for n in names]
            assert where == sorted(where), f"{path.name} call {call} plans {names}, run_gpu.sh runs them as {ran}"
        planned |= {n for _, n, _, _ in plan["steps"]}
        assert {name for kind, name, _ in calls if kind == "repair"} == set(plan["repairs"]), path.name
    assert set(ran) == planned, f"steps in run_gpu.sh that no plan has: {set(ran) - planned}"
    assert "benchmarks/gpu/plan.tsv" in script and "benchmarks/gpu/plan-20.tsv" in script
    assert not re.search(r"^\s*step \w+ \d", script, flags=re.M)  # the budgets are the plans', not the script's


def _functions(script: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+)\(\) \{(.*?)^\}", script, flags=re.M | re.S)}


def _commands(text: str) -> list[tuple[str, list[str], str]]:
    """The benchmark scripts ``text`` runs: ``(path, --flags, the rest of the line)``."""
    out = []
    for m in re.finditer(r'(?:"?\$PY"?|bash)\s+(?:\$B/|benchmarks/)(\S+\.(?:py|sh))([^\n;&|]*)', text):
        out.append(("benchmarks/" + m.group(1), re.findall(r"(?<!\S)(--[a-z][\w-]*)", m.group(2)), m.group(2)))
    return out


def test_every_planned_step_names_a_command_that_exists():
    """Each step of either plan runs a benchmark, script or function of run_gpu.sh that is there, with
    options that script defines (argparse), presets and ladder variants that exist, and the test
    files it names."""
    from cps_fast.config import list_presets

    script = RUN_GPU.read_text()
    funcs = _functions(script)
    steps = {name: cmd for kind, name, cmd in script_steps() if kind == "step"}
    for issue, path in PLANS.items():
        for _, name, _, _ in load_plan(path)["steps"]:
            cmd = steps[name]
            func = cmd.split()[0] in funcs  # one of run_gpu.sh's functions (env_check: its own Python)
            body = funcs[cmd.split()[0]] if func else cmd
            commands = _commands(body)
            assert func or commands, f"step {name} ({path.name}): neither a function nor a benchmark in {cmd!r}"
            for file, flags, rest in commands:
                assert (ROOT / file).is_file(), f"step {name}: {file} does not exist"
                src = (ROOT / file).read_text()
                if "common.add_case_args" in src:
                    src += (ROOT / "benchmarks" / "common.py").read_text()
                if file.endswith(".py"):
                    for flag in flags:
                        assert f'"{flag}"' in src, f"step {name}: {file} has no option {flag}"
                preset = re.search(r"--preset\s+(\S+)", rest)
                if preset:
                    assert preset.group(1) in list_presets(), f"step {name}: no preset {preset.group(1)}"
                variants = re.search(r"--variants\s+(\S+)", rest)
                if variants:
                    for v in variants.group(1).split(","):
                        assert f'("{v}",' in src, f"step {name}: bench_step.py has no variant {v}"
            for test_file in re.findall(r"tests/test_\w+\.py", body):
                assert (ROOT / test_file).is_file(), f"step {name}: {test_file} does not exist"
    for path in PLANS.values():  # the calls' commands name this script, with the ISSUE that picks the plan
        for call, command in load_plan(path)["commands"].items():
            assert command.split()[-1] == "benchmarks/run_gpu.sh", command
            issue = next((k for k, v in PLANS.items() if v == path))
            assert (f"ISSUE={issue} " in command) == (issue != 19), command
            assert (f"CALL={call} " in command) == (call != 1), command


def test_plan_mode_prints_both_calls_and_the_session_without_python():
    plan = load_plan()
    s = plan["session"]
    res = plan_mode()
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for call, deadline in plan["calls"].items():
        assert f"call {call}: " in out and f"worst case {deadline}s of the {deadline}s deadline" in out, out
    for call in (1, 2):
        block = out.split(f"call {call}: ", 1)[1].split("worst case", 1)[0]
        for name, granted in walk(plan, call):
            lo, hi = next((lo, hi) for n, lo, hi in steps_of(plan, call) if n == name)
            assert re.search(rf"^\s+{name}\s+step\s+{lo}\s+{hi}\s+{granted}\s", block, flags=re.M), (name, block)
    total = s["start"] + sum(d + s["transfer"] for d in plan["calls"].values()) + s["between"] + s["release"]
    assert f"= {total}s of {s['device']}s device time" in out, out
    assert "only when needed: build" in out and 'with STEPS="..." only: model data' in out


def test_plan_mode_shows_what_a_late_start_skips():
    plan = load_plan()
    elapsed = 300
    expected = walk(plan, 1, elapsed)
    assert any(t is None for _, t in expected), "pick an ELAPSED that skips a step"
    res = plan_mode(env={"CALL": "1", "ELAPSED": str(elapsed)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "call 2:" not in res.stdout
    for name, granted in expected:
        if granted is None:
            lo = next(lo for n, lo, _ in steps_of(plan, 1) if n == name)
            assert re.search(rf"skip {name}: \d+s left before the deadline, it needs {lo}s", res.stdout), res.stdout
        else:
            assert re.search(rf"^\s+{name}\s+step\s+\d+\s+\d+\s+{granted}\s", res.stdout, flags=re.M), res.stdout


def test_plan_mode_refuses_a_bad_plan_and_a_bad_call(tmp_path):
    bad = tmp_path / "plan.tsv"
    bad.write_text(PLAN.read_text().replace("step 1 loss      40", "step 1 loss      forty"))
    res = plan_mode(env={"PLANFILE": str(bad)})
    assert res.returncode == 2 and re.search(r"plan.tsv line \d+: expected: step 1\|2\|- NAME MIN MAX", res.stderr), res.stderr
    res = plan_mode(env={"CALL": "3"})
    assert res.returncode == 2 and "CALL=3: expected 1 or 2" in res.stderr


def _fake_tools(tmp_path) -> dict:
    """A fake ``nvidia-smi`` and ``python3`` for run_gpu.sh's control flow (no torch, no GPU): the
    environment check's Python (read from stdin) sleeps or says there is no GPU (FAKE_ENV); the
    install's ``ready`` check sleeps the first time and passes the second (a timed-out install
    that landed); targets.py and everything else succeed. RUN_DIR and OUT: folders under tmp_path."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'Fake GPU'\n")
    (bin_ / "python3").write_text(f"""#!/usr/bin/env bash
case "$1" in
  -) cat > /dev/null
     [[ $FAKE_ENV == sleep ]] && exec sleep 30
     [[ $FAKE_ENV == nogpu ]] && {{ echo "torch sees no CUDA device (fake)"; exit 4; }}
     echo "cps_fast._C: not installed"; exit 0 ;;
  -c) [[ $2 == *"cps_fast._C as c"* ]] || exit 0
      n=$(cat {tmp_path}/ready-calls 2> /dev/null || echo 0)
      echo $(( n + 1 )) > {tmp_path}/ready-calls
      (( n == 0 )) && exec sleep 30
      exit 0 ;;
  *) exit 0 ;;
esac
""")
    for f in bin_.iterdir():
        f.chmod(0o755)
    plan = tmp_path / "plan.tsv"  # the real plan with 1 s caps for env and install
    plan.write_text(re.sub(r"^step 1 (env|install) .*$", r"step 1 \1 1 1 short", PLAN.read_text(), flags=re.M))
    (tmp_path / "run").mkdir()
    (tmp_path / "out").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CALL", "STEPS", "ELAPSED", "PLAN", "BUDGET")}
    return dict(env, PATH=f"{bin_}:{os.environ['PATH']}", PY=str(bin_ / "python3"), PLANFILE=str(plan),
                RUN_DIR=str(tmp_path / "run"), OUT=str(tmp_path / "out"), STEPS="env install")


def test_a_timed_out_check_or_install_does_not_stop_the_call_only_no_gpu_does(tmp_path):
    """A fresh machine's first cold import torch can outlast the env step: the call goes on (the
    install and the tests decide). An install cut off at its cap that landed anyway is asked once
    more (install.sh --ready) and counts as installed. Only the check's own "torch sees no CUDA
    device" stops the call."""
    env = _fake_tools(tmp_path)
    res = subprocess.run(["bash", str(RUN_GPU)], env=dict(env, FAKE_ENV="sleep"), capture_output=True, text=True,
                         timeout=60)
    out = res.stdout + res.stderr
    steps = (tmp_path / "run" / "steps.tsv").read_text()
    assert res.returncode == 0, out
    assert re.search(r"^env\ttimed out after 1s", steps, flags=re.M), steps
    assert re.search(r"^install\ttimed out after 1s", steps, flags=re.M), steps
    assert re.search(r"^install-ready\tinstalled after all", steps, flags=re.M), steps
    assert "the environment check did not finish" in out and "stopping" not in out, out
    res = subprocess.run(["bash", str(RUN_GPU)], env=dict(env, FAKE_ENV="nogpu"), capture_output=True, text=True,
                         timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "torch sees no CUDA device" in out and "stopping" in out, out
    assert not re.search(r"\] install \(at most", out), out  # nothing after the check


# ----------------------------------------------------------------------------- issue 20: DALI's pack and plan

PACK_DALI = ROOT / "benchmarks" / "gpu" / "pack_dali.sh"
INSTALL_DALI = ROOT / "benchmarks" / "gpu" / "install_dali.sh"
DALI_PART = re.compile(r"^\.dali/dali\.tar\.xz\.(\d+)$")


def _tree_bytes() -> int | None:
    """What travels with every call: tracked and untracked-not-ignored files (None without git)."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                               check=True, timeout=60).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return None
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def test_issue_20_plan_runs_dali_first_and_its_benchmarks():
    plan = load_plan(PLAN20)
    call1 = [n for n, _, _ in steps_of(plan, 1)]
    call2 = [n for n, _, _ in steps_of(plan, 2)]
    # DALI where its pack lands (one part: no warm machine needed), the tests before the benchmarks
    assert call1 == ["env", "install", "dali", "dali_tests", "dali_step", "dali_data"], call1
    assert call2 == ["env", "ncps_k", "model_os"], call2
    assert [n for c, n, _, _ in plan["steps"] if c == "-"] == ["cs_step"]
    for name, cap in FRESH_MACHINE_CAPS.items():  # call 1 runs on a fresh machine
        assert dict((n, hi) for n, _, hi in steps_of(plan, 1))[name] >= cap, name
        assert plan["repairs"].get(name, (0, cap))[1] >= cap, name
    assert set(plan["repairs"]) == {"install", "build"}
    for call in (1, 2):
        assert all(t is not None for _, t in walk(plan, call)), walk(plan, call)


def test_issue_20_calls_carry_at_most_64_mib_and_the_dali_parts_before_dali():
    """Each call's carried paths, at their caps, with the working tree's allowance, fit the device
    tool's 64 MiB; the working tree fits its allowance; every DALI part travels no later than the
    call that installs it (a carried path stays on the warm machine), and the checksums with each
    part; .prebuilt travels with each call that may install the extension (both: call 2's repair)."""
    plan = load_plan(PLAN20)
    size, carry = plan["size"], plan["carry"]
    assert size["call"] == CARRY_LIMIT_MIB and set(carry) <= set(plan["calls"])
    for call, paths in carry.items():
        total = size["tree"] + sum(mib for _, mib in paths)
        assert total <= size["call"], f"call {call} carries up to {total} MiB, over {size['call']}"
        assert len(paths) <= 8 and len({p for p, _ in paths}) == len(paths), paths  # run's carry: 8 paths
    parts = {int(DALI_PART.match(p).group(1)): (call, mib) for call, paths in carry.items() for p, mib in paths
             if DALI_PART.match(p)}
    assert sorted(parts) == list(range(1, len(parts) + 1)), parts
    dali_call = next(int(c) for c, n, _, _ in plan["steps"] if n == "dali")
    for k, (call, _) in parts.items():
        assert call <= dali_call, f"part {k} travels in call {call}, after the dali step's call {dali_call}"
        assert ".dali/SHA256SUMS" in [p for p, _ in carry[call]], f"call {call} carries part {k} without the checksums"
    for call in plan["calls"]:
        assert ".prebuilt" in [p for p, _ in carry.get(call, [])], f"call {call} does not carry .prebuilt"
    tree = _tree_bytes()
    if tree is not None:
        assert tree <= size["tree"] * 2**20, f"the working tree is {tree / 2**20:.1f} MiB, over its {size['tree']} MiB"
    # the packer splits by these rows, and a pack made here keeps to them
    assert "benchmarks/gpu/plan-20.tsv" in PACK_DALI.read_text()
    sums = ROOT / ".dali" / "SHA256SUMS"
    if sums.exists():
        for line in sums.read_text().splitlines():
            name = line.split()[1]
            k = int(name.rsplit(".", 1)[1])
            assert k in parts, f"{sums} names {name}, which no carry row of plan-20.tsv carries"
            assert (ROOT / ".dali" / name).stat().st_size <= parts[k][1] * 2**20, name


def test_plan_mode_prints_issue_20s_calls_with_what_they_carry():
    plan = load_plan(PLAN20)
    s = plan["session"]
    res = plan_mode(env={"ISSUE": "20"})
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for call, deadline in plan["calls"].items():
        block = out.split(f"call {call}: ", 1)[1].split("worst case", 1)[0]
        carried = ", ".join(f'"{p}"' for p, _ in plan["carry"][call])
        assert f'run(command="{plan["commands"][call]}", carry=[{carried}], timeout_s={s["limit"]})' in block, block
        for name, granted in walk(plan, call):
            lo, hi = next((lo, hi) for n, lo, hi in steps_of(plan, call) if n == name)
            assert re.search(rf"^\s+{name}\s+step\s+{lo}\s+{hi}\s+{granted}\s", block, flags=re.M), (name, block)
    total = s["start"] + sum(d + s["transfer"] for d in plan["calls"].values()) + s["between"] + s["release"]
    assert f"= {total}s of {s['device']}s device time" in out and 'with STEPS="..." only: cs_step' in out, out
    res = plan_mode(env={"ISSUE": "21"})
    assert res.returncode == 2 and "ISSUE=21: expected 19" in res.stderr, res.stderr


def test_plan_mode_refuses_a_call_that_carries_too_much(tmp_path):
    bad = tmp_path / "plan.tsv"
    bad.write_text(re.sub(r"^carry 1 \.dali/dali\.tar\.xz\.1\s+\d+", "carry 1 .dali/dali.tar.xz.1  60", PLAN20.read_text(),
                          flags=re.M))
    res = plan_mode(env={"ISSUE": "20", "PLANFILE": str(bad)})
    assert res.returncode == 1 and re.search(r"call 1 carries up to \d+ MiB, over 64 MiB", res.stderr), res.stderr
    bad.write_text(PLAN20.read_text().replace("size tree ", "size trees "))
    res = plan_mode(env={"ISSUE": "20", "PLANFILE": str(bad)})
    assert res.returncode == 2 and "expected: size call|tree MIB" in res.stderr, res.stderr


def test_a_missing_dali_pack_stops_issue_20s_call(tmp_path):
    """Without the pack (a fresh machine that lost it, or a call that did not carry it) the dali step
    fails saying what is missing, and the call stops: every step after it needs DALI."""
    env = _fake_tools(tmp_path)
    (tmp_path / "run" / "extension.txt").write_text("ready\n")  # installed (no env step to reset it)
    env = dict(env, ISSUE="20", PLANFILE=str(PLAN20), STEPS="dali dali_tests", DALI_PACK=str(tmp_path / "none"),
               DALI_SITE=str(tmp_path / "site"))
    res = subprocess.run(["bash", str(RUN_GPU)], env=env, capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert f"install_dali: no {tmp_path / 'none'}/SHA256SUMS" in out and "no DALI from the pack" in out, out
    assert "stopping" in out and not re.search(r"\] dali_tests \(at most", out), out
    assert re.search(r"^dali\texit 3", (tmp_path / "run" / "steps.tsv").read_text(), flags=re.M)


def _fake_pack(tmp_path, parts=2):
    """A pack as pack_dali.sh writes it (an xz tar in parts, SHA256SUMS), holding an nvidia/dali
    that fails to import."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in (("nvidia/__init__.py", ""), ("nvidia/dali/__init__.py", "raise ImportError('a fake DALI')\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    data = buf.getvalue()
    pack = tmp_path / "pack"
    pack.mkdir()
    cut = len(data) // parts
    chunks = [data[i * cut:(i + 1) * cut if i < parts - 1 else len(data)] for i in range(parts)]
    lines = []
    for i, chunk in enumerate(chunks, 1):
        (pack / f"dali.tar.xz.{i}").write_bytes(chunk)
        lines.append(f"{hashlib.sha256(chunk).hexdigest()}  dali.tar.xz.{i}")
    (pack / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return pack


def test_install_dali_checks_the_parts_unpacks_once_and_runs_the_check(tmp_path):
    pack, site = _fake_pack(tmp_path), tmp_path / "site"
    env = dict(os.environ, PY=sys.executable, DALI_PACK=str(pack), DALI_SITE=str(site), PYTHONPATH="")

    def install():
        res = subprocess.run(["bash", str(INSTALL_DALI)], env=env, capture_output=True, text=True, timeout=120)
        return res.returncode, res.stdout + res.stderr

    part2 = (pack / "dali.tar.xz.2").read_bytes()
    (pack / "dali.tar.xz.2").unlink()
    rc, out = install()
    assert rc == 3 and f"{pack}/dali.tar.xz.2 is missing" in out and not site.exists(), out
    (pack / "dali.tar.xz.2").write_bytes(part2[:-1] + bytes([part2[-1] ^ 1]))
    rc, out = install()
    assert rc == 3 and "checksum" in out and not site.exists(), out
    (pack / "dali.tar.xz.2").write_bytes(part2)
    rc, out = install()  # unpacked; the check imports this nvidia.dali, which fails
    assert (site / "nvidia" / "dali" / "__init__.py").is_file(), out
    assert rc == 1 and "import nvidia.dali failed: ImportError: a fake DALI" in out, out
    assert "does not import from" in out, out
    rc, out = install()
    assert rc == 1 and "unpacked in" in out and "already" in out, out


def test_prune_fatbin_blanks_other_archs_and_keeps_sm_90(tmp_path):
    """A shared library built here with a .nv_fatbin section of two fat binaries: the one with an
    sm_90 cubin keeps it byte for byte and has its sm_80 cubin and PTX zeroed; the one without
    sm_90 is left alone; nothing else in the file changes, and --check says so (and catches a
    change elsewhere)."""
    import shutil
    import struct

    import prune_fatbin

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the test library")

    def entry(kind, arch, payload):
        head = struct.pack("<HHIQIIHHIIIQQQ", kind, 0x101, 64, len(payload), len(payload), 0, 0, 8, arch, 0, 0,
                           0x8011, 0, len(payload))
        assert len(head) == 64
        return head + payload

    def fatbin(*entries):
        body = b"".join(entries)
        return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body

    p80, p90, ptx, keep80, keepptx = (bytes([v]) * n for v, n in ((0x11, 40), (0x22, 48), (0x33, 32), (0x44, 24),
                                                                      (0x55, 16)))
    blob = fatbin(entry(2, 80, p80), entry(2, 90, p90), entry(1, 120, ptx)) + fatbin(entry(2, 80, keep80),
                                                                                     entry(1, 80, keepptx))
    src = tmp_path / "fb.c"
    src.write_text("__attribute__((section(\".nv_fatbin\"), used, aligned(8))) const unsigned char fb[] = {"
                   + ",".join(str(b) for b in blob) + "};\nint f(void) { return fb[3]; }\n")
    lib = tmp_path / "lib" / "libfb.so"
    lib.parent.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True, timeout=120)
    orig = tmp_path / "orig"
    orig.mkdir()
    shutil.copy2(lib, orig / "libfb.so")
    before = lib.read_bytes()
    assert before.count(p90) == 1 and before.count(p80) == 1
    assert prune_fatbin.main([str(lib.parent)]) == 0
    after = lib.read_bytes()
    assert len(after) == len(before) and after.count(p90) == 1 and after.index(p90) == before.index(p90)
    assert p80 not in after and ptx not in after
    assert after[before.index(p80):before.index(p80) + len(p80)] == bytes(len(p80))
    assert keep80 in after and keepptx in after  # no sm_90 cubin in that fat binary: left alone
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert len(changed) == len(p80) + len(ptx)
    assert prune_fatbin.main([str(lib.parent), "--check", str(orig)]) == 0
    after = bytearray(after)
    after[0x100] ^= 1
    lib.write_bytes(after)
    assert prune_fatbin.main([str(lib.parent), "--check", str(orig)]) == 1


# ----------------------------------------------------------------------------- GPU tests select themselves


def test_a_cuda_device_parameter_marks_the_test_gpu():
    """tests/conftest.py marks ``gpu`` every test with a device parameter set to CUDA (before -m
    selects), so that ``-m gpu`` on the GPU machine runs the CUDA cases of the CPU-and-CUDA suites."""
    import types

    import conftest

    class Item:
        def __init__(self, **params):
            self.callspec = types.SimpleNamespace(params=params)
            self.keywords = {}

        def add_marker(self, mark):
            self.keywords[mark.name] = mark

    cases = [(dict(device="cuda", backend="triton"), True), (dict(device="cpu", backend="cuda"), False),
             (dict(device=torch.device("cuda", 0)), True), (dict(out_device="cuda:1"), True),
             (dict(device="cpu"), False), ({}, False),
             # DALI's GPU backend (issue 20), and the CUDA extension where no device parameter says otherwise
             (dict(backend="dali-gpu"), True), (dict(backend="dali-cpu"), False), (dict(backend="pytorch"), False),
             (dict(backend="cuda", layout="nchw"), True), (dict(backend="cpu", C=21), False),
             (dict(target=torch.device("cuda")), True), (dict(name="cudagraph"), False)]
    for params, gpu in cases:
        item = Item(**params)
        conftest.pytest_itemcollected(item)
        assert ("gpu" in item.keywords) == gpu, params


# ----------------------------------------------------------------------------- the prebuilt extension


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions (importing it runs no setup()), in the project folder, default switches."""
    for key in ("CPS_FAST_CUDA_ARCHS", "CPS_FAST_PORTABLE", "CPS_FAST_SKIP_CUDA_BUILD", "CPS_FAST_PREBUILT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(ROOT)
    return check_prebuilt.load_setup()


def _stamped_copy(setup_py, tmp_path, **changes) -> Path:
    """The extension this checkout built, copied with a stamp naming what a build here would be."""
    import cps_fast._C

    so = tmp_path / "cps_fast_C-test.so"
    so.write_bytes(Path(cps_fast._C.__file__).read_bytes())
    stamp = setup_py._identity(torch, setup_py._recipe(torch))
    stamp["sha256"] = hashlib.sha256(so.read_bytes()).hexdigest()
    stamp.update(changes)
    so.with_suffix(".json").write_text(json.dumps(stamp))
    return so


def test_identity_names_the_build_the_switches_ask_for(setup_py, monkeypatch):
    native = setup_py._identity(torch, setup_py._recipe(torch))
    assert native["torch"] == torch.__version__ and native["ext_suffix"] == sysconfig.get_config_var("EXT_SUFFIX")
    assert "-march=native" in native["flags"]["cxx"] and native["cpu"]
    assert len(native["sources_sha256"]) == 64
    monkeypatch.setenv("CPS_FAST_PORTABLE", "1")
    portable = setup_py._identity(torch, setup_py._recipe(torch))
    assert "-march=native" not in portable["flags"]["cxx"] and portable["cpu"] is None
    assert portable["sources_sha256"] == native["sources_sha256"]
    # the device's stamp: CUDA kernels for exactly the archs asked for
    assert setup_py._gencode_flags("90a") == ["-gencode=arch=compute_90a,code=sm_90a"]


def test_a_matching_prebuilt_extension_stands_in_for_the_build(setup_py, tmp_path):
    so = _stamped_copy(setup_py, tmp_path)
    assert setup_py._prebuilt_refusal(str(so), setup_py._identity(torch, setup_py._recipe(torch))) is None


@pytest.mark.parametrize("change,reason", [
    (dict(torch="2.11.0+cu130"), r"has torch='2.11.0\+cu130', this build needs '" + re.escape(torch.__version__)),
    (dict(sources_sha256="0" * 64), r"has sources_sha256='0000.*', this build needs"),
    (dict(flags={"cxx": ["-O0"], "nvcc": None, "ld": []}), r"has flags=.*-O0"),
    (dict(sha256="f" * 64), r"has sha256 [0-9a-f]{16}\.\.\., its stamp says ffff.*changed since"),
])
def test_a_mismatched_prebuilt_extension_is_refused_saying_why(setup_py, tmp_path, change, reason):
    so = _stamped_copy(setup_py, tmp_path, **change)
    why = setup_py._prebuilt_refusal(str(so), setup_py._identity(torch, setup_py._recipe(torch)))
    assert why is not None and re.search(reason, why), why


def test_a_missing_prebuilt_or_stamp_is_refused(setup_py, tmp_path):
    identity = setup_py._identity(torch, setup_py._recipe(torch))
    assert "does not exist" in setup_py._prebuilt_refusal(str(tmp_path / "none.so"), identity)
    (tmp_path / "x.so").write_bytes(b"\x7fELF")
    assert "its stamp" in setup_py._prebuilt_refusal(str(tmp_path / "x.so"), identity)


def test_the_probe_decides_on_cuda_kernels_and_the_gpu(setup_py, tmp_path, monkeypatch):
    """What the import in a child process reports: CUDA kernels exactly when the build asks for
    them, and for the GPU present (sm_90a code runs on compute capability 9.0 only)."""
    so = _stamped_copy(setup_py, tmp_path, archs="90a")
    identity = dict(setup_py._identity(torch, setup_py._recipe(torch)), archs="90a")
    reports = []

    def probe(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(reports[-1]) + "\n", stderr="")

    monkeypatch.setattr(setup_py.subprocess, "run", probe)
    reports.append({"has_cuda": False, "capability": None})
    assert "has_cuda()=False, this build asks for True" in setup_py._prebuilt_refusal(str(so), identity)
    reports.append({"has_cuda": True, "capability": [8, 0]})
    assert "this GPU is sm_80" in setup_py._prebuilt_refusal(str(so), identity)
    reports.append({"has_cuda": True, "capability": [9, 0]})
    assert setup_py._prebuilt_refusal(str(so), identity) is None


def test_build_ext_copies_the_prebuilt_or_compiles(setup_py, tmp_path, monkeypatch):
    """The switch at build time: the accepted file lands where the build would have written the
    extension, and nothing is compiled; a refused one falls back to torch's build."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    so = tmp_path / "prebuilt.so"
    so.write_bytes(os.urandom(64))
    monkeypatch.setenv("CPS_FAST_PREBUILT", str(so))
    recipe = setup_py._recipe(torch)
    compiled = []
    monkeypatch.setattr(BuildExtension, "build_extensions", lambda self: compiled.append(self.extensions))

    def build(refusal):
        monkeypatch.setattr(setup_py, "_prebuilt_refusal", lambda path, identity, probed=None: refusal)
        dist = Distribution({"name": "cps-fast", "ext_modules": [CppExtension("cps_fast._C", recipe["cpp"])]})
        cmd = setup_py._build_ext(BuildExtension, torch, recipe)(dist)
        cmd.build_lib = str(tmp_path / "lib")
        cmd.ensure_finalized()
        cmd.run()
        return tmp_path / "lib" / "cps_fast" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"

    out = build(None)
    assert out.read_bytes() == so.read_bytes() and not compiled
    out.unlink()
    build("its stamp is for another torch")
    assert compiled and not out.exists()
    monkeypatch.delenv("CPS_FAST_PREBUILT")
    plain = setup_py._build_ext(BuildExtension, torch, recipe)  # without the switch: torch's build as it was
    assert issubclass(plain, BuildExtension) and plain.__name__ != "build_ext_or_prebuilt"


def test_check_prebuilt_cli_says_why(setup_py, tmp_path, capsys):
    so = _stamped_copy(setup_py, tmp_path, python="3.12")
    assert check_prebuilt.main([str(so)]) == 3
    assert re.search(r"prebuilt refused: .* has python='3.12', this build needs", capsys.readouterr().out)


def test_check_prebuilt_hands_the_probed_checksum_to_the_build(setup_py, tmp_path, capsys, monkeypatch):
    """install.sh passes the checksum check_prebuilt.py printed as CPS_FAST_PREBUILT_PROBED; the
    build then skips its own import probe (torch and CUDA start-up once more) for exactly that
    file, and probes anything else."""
    so = _stamped_copy(setup_py, tmp_path)
    assert check_prebuilt.main([str(so)]) == 0
    line = capsys.readouterr().out.strip()
    digest = hashlib.sha256(so.read_bytes()).hexdigest()
    assert line == f"prebuilt ok: {so} sha256={digest}"
    probes = []
    real_run = setup_py.subprocess.run
    monkeypatch.setattr(setup_py.subprocess, "run", lambda cmd, **kw: probes.append(cmd) or real_run(cmd, **kw))
    identity = setup_py._identity(torch, setup_py._recipe(torch))
    assert setup_py._prebuilt_refusal(str(so), identity, digest) is None and probes == []
    assert setup_py._prebuilt_refusal(str(so), identity, "0" * 64) is None and len(probes) == 1
    # the stamp's checks still run: a changed file is refused whatever checksum was handed over
    so.write_bytes(so.read_bytes() + b"\0")
    why = setup_py._prebuilt_refusal(str(so), identity, hashlib.sha256(so.read_bytes()).hexdigest())
    assert why is not None and "changed since" in why and len(probes) == 1
