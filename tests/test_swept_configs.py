"""The kernel configurations that benchmarks/run_gpu.sh sweeps are correct kernels.

The GPU run times forced tile configurations of the fused losses beside the heuristic's
(`tiles` step: bench_loss.py --triton-configs; `ncps` step: bench_ncps.py providers
triton[eN] and triton[BPxW]; `upsample` step: bench_upsample.py providers fused[BHxBW:F:W:AX]),
and the fastest becomes the heuristic. A speed is only worth
having from a kernel that computes the loss, so each swept configuration runs here through
the benchmark's own provider (the Triton interpreter on CPU tensors, compiled Triton on a
GPU) against the float64 reference, and a spy checks that the forced configuration is the
one launched. The configurations are read from run_gpu.sh, so a new one is tested as soon
as it is swept.
"""
import re
import sys
from pathlib import Path

import pytest
import torch

from cps_fast import backends
from helpers import assert_grads_close, make_labels, make_logits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_loss  # noqa: E402
import bench_ncps  # noqa: E402
import bench_upsample  # noqa: E402
import test_loss  # noqa: E402
import test_ncps_loss  # noqa: E402
import test_upsample_loss  # noqa: E402

pytestmark = pytest.mark.poison_outputs  # NaN-filled kernel outputs (tests/conftest.py)

RUN_GPU = (ROOT / "benchmarks" / "run_gpu.sh").read_text()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton on a GPU, its interpreter here
HAS_TRITON = "triton" in backends.available_backends(DEVICE)


def _swept(pattern: str, what: str) -> list[str]:
    found = re.search(pattern, RUN_GPU)
    assert found, f"benchmarks/run_gpu.sh no longer has {what} (pattern {pattern!r}); update this test"
    return found.group(1).split(",")


LOSS_CONFIGS = _swept(r"bench_loss\.py --providers triton --triton-configs (\S+)", "the tiles step's sweep")
NCPS_PROVIDERS = [p for p in _swept(r'bench_ncps\.py [^\n]*--providers "([^"]+)"', "the ncps step's providers")
                  if p.startswith("triton[")]
UPSAMPLE_PROVIDERS = [p for p in _swept(r'bench_upsample\.py \\\n\s*--providers "([^"]+)"', "the upsample step's providers")
                      if bench_upsample.FORCED_CONFIG.fullmatch(p)]


class Spy:
    """Stands in for a Triton kernel object: records each launch's constexprs, then launches."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, kwargs.get("BLOCK_P"), kwargs.get("num_warps")))
            return self.kernel[grid](*args, **kwargs)
        return launch


def spy_on(monkeypatch, module, names):
    launches = []
    for name in names:
        monkeypatch.setattr(module, name, Spy(getattr(module, name), name, launches))
    return launches


def assert_matches(loss, grads, xs, ref, lowp):
    """The benchmark's loss and gradients against the float64 reference ``ref`` = (loss, sup, cps, grads),
    with tests/test_loss.py's tolerance: float32 rounding for the loss; for the gradients twice the
    error PyTorch makes in the logits' dtype (``lowp``), plus a floor."""
    assert loss.dtype == torch.float32 and torch.isfinite(loss), f"loss is {loss}"
    torch.testing.assert_close(loss.double(), ref[0], rtol=2e-5, atol=2e-5)
    floor = 1e-6 if xs[0].dtype == torch.float32 else 1e-3 * max(float(r.abs().max()) for r in ref[3])
    assert_grads_close(((f"grad[{k}]", *v) for k, v in enumerate(zip(grads, ref[3], lowp[3], xs))), floor)


def run_provider(fn, xs):
    """(loss, grads) of ``fn(leaves)``, a benchmark's loss function on leaf copies of the logits."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    loss = fn(leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def test_the_sweeps_were_found():
    assert len(LOSS_CONFIGS) >= 2 and all(LOSS_CONFIGS)
    assert NCPS_PROVIDERS, "run_gpu.sh's ncps step sweeps no forced n-CPS configuration"
    assert UPSAMPLE_PROVIDERS, "run_gpu.sh's upsample step sweeps no forced configuration"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
@pytest.mark.parametrize("device", [DEVICE])  # a parameter: its cuda case is marked gpu (conftest)
@pytest.mark.parametrize("config", LOSS_CONFIGS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("C,dtype", [(21, torch.bfloat16), (19, torch.float32)])
def test_swept_cps_loss_configuration(config, layout, C, dtype, device, monkeypatch):
    provider = bench_loss.config_provider(config)
    if provider.startswith("triton[flat") and layout != "channels_last":
        pytest.skip("bench_loss.py runs the flat kernel on channels_last only")
    from cps_fast.kernels import cps_loss as triton_ops

    launches = spy_on(monkeypatch, triton_ops, ["_cps_loss_tile_kernel", "_cps_loss_flat_kernel"])
    fn = bench_loss.make_provider(provider, torch.device(device), dtype)
    assert not isinstance(fn, str), f"{provider}: {fn}"
    N, H, W = 2, 7, 9  # 126 pixels: every tile size here ends mid-image and mid-row, or is cut short
    a, b = (make_logits(layout, N, C, H, W, dtype, device) for _ in range(2))
    target = make_labels((N, H, W), C, 0.3, device)
    loss, grads = run_provider(lambda ab: fn(*ab, target), (a, b))
    ref = test_loss.run(test_loss.cps_loss_reference, a.double(), b.double(), target, cps_weight=1.5)
    lowp = ref if dtype == torch.float32 else test_loss.run(test_loss.lowp_reference, a, b, target, cps_weight=1.5)
    assert_matches(loss, grads, (a, b), (*ref[:3], ref[3:]), (*lowp[:3], lowp[3:]))
    parts = config.split(":")
    kernel = "_cps_loss_flat_kernel" if parts[0] == "flat" else "_cps_loss_tile_kernel"
    dims = parts[1:] if parts[0] == "flat" else parts
    assert launches and launches[0][0] == kernel, f"{config}: launched {launches}"
    if dims:
        assert launches[0][1:] == tuple(int(d) for d in dims), f"{config}: launched {launches}"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
@pytest.mark.parametrize("device", [DEVICE])  # a parameter: its cuda case is marked gpu (conftest)
@pytest.mark.parametrize("provider", NCPS_PROVIDERS)
@pytest.mark.parametrize("K", [3, 4])  # K = 2 runs the two-branch kernel: bench_loss.py's sweep, above
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_swept_ncps_configuration(provider, K, layout, device, monkeypatch):
    from cps_fast.kernels import ncps_loss as triton_ops

    launches = spy_on(monkeypatch, triton_ops, ["_ncps_tile_kernel"])
    dtype = torch.bfloat16
    fn = bench_ncps.make_provider(provider, torch.device(device), dtype, False)
    assert not isinstance(fn, str), f"{provider}: {fn}"
    N, C, H, W = 2, 21, 7, 9  # 126 pixels: tiles end mid-image and mid-row, or are cut short
    xs = [make_logits(layout, N, C, H, W, dtype, device) for _ in range(K)]
    target = make_labels((N, H, W), C, 0.3, device)
    loss, grads = run_provider(lambda leaves: fn(leaves, target), xs)
    ref = test_ncps_loss.run(test_ncps_loss.ncps_loss_reference, [x.double() for x in xs], target, cps_weight=1.5)
    lowp = test_ncps_loss.run(test_ncps_loss.lowp_reference, xs, target, cps_weight=1.5)
    assert_matches(loss, grads, xs, ref, lowp)
    forced = re.fullmatch(r"triton\[(?:e(\d+)|(\d+)x(\d+))\]", provider)
    assert forced, provider
    assert launches, f"{provider}: the tile kernel did not run"
    if forced.group(2):
        assert launches[0][1:] == (int(forced.group(2)), int(forced.group(3))), f"{provider}: launched {launches}"
    else:  # N elements of each branch's tile per thread: BLOCK_P * BLOCK_C / (32 N) threads
        block_p = launches[0][1]
        assert launches[0][2] == max(1, min(16, block_p * 32 // (int(forced.group(1)) * 32))), launches


@pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
@pytest.mark.parametrize("device", [DEVICE])  # a parameter: its cuda case is marked gpu (conftest)
@pytest.mark.parametrize("provider", UPSAMPLE_PROVIDERS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("C,dtype", [(21, torch.bfloat16), (19, torch.float32)])
def test_swept_upsample_configuration(provider, layout, C, dtype, device, monkeypatch):
    from cps_fast.kernels import cps_upsample as triton_ops

    launched = []
    monkeypatch.setattr(triton_ops, "_cps_upsample_kernel", Spy(triton_ops._cps_upsample_kernel, "upsample", launched))
    blocks = []  # what block_config returned to the launcher: (BH, BW, BLOCK_F, BLOCK_C, num_warps, AX)
    real_config = triton_ops.block_config
    monkeypatch.setattr(triton_ops, "block_config", lambda *a, **k: blocks.append(real_config(*a, **k)) or blocks[-1])
    size = (11, 13)  # 5 x 6 low-res pixels: every swept block (4x4 to 8x8) is cut at both edges
    fn = bench_upsample.make_provider(provider, torch.device(device), dtype, size, None)
    assert not isinstance(fn, str), f"{provider}: {fn}"
    a, b = (test_upsample_loss.make_low(2, C, 5, 6, dtype, layout, device, size=size) for _ in range(2))
    target = make_labels((2, *size), C, 0.3, device)
    leaves = [x.detach().clone().requires_grad_() for x in (a, b)]
    loss = fn(*leaves, target)
    loss.backward()
    # the provider returns the loss only: its parts are not compared
    got = (loss.detach(), None, None, leaves[0].grad, leaves[1].grad)
    test_upsample_loss.assert_close_to_reference(got, a, b, target, backend="triton", size=size,
                                                 cps_weight=bench_upsample.CPS_WEIGHT)
    forced = tuple(int(g) for g in bench_upsample.FORCED_CONFIG.fullmatch(provider).groups())
    assert launched, f"{provider}: the kernel did not run"
    assert blocks and all(cfg[:3] + cfg[4:] == forced for cfg in blocks), f"{provider}: launched with {blocks}"
