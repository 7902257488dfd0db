"""Checks that the DALI pack (benchmarks/gpu/pack_dali.sh) works where it was unpacked (issue 20).

``import nvidia.dali`` from the pack's folder, the import of ``nvidia.dali.plugin.pytorch`` (the
dali-gpu loader's ``feed_ndarray``), then the decoders the data pipelines use, on images written
here with PIL and compared with PIL's own decoding:

  cpu    pipeline_def(device_id=None): an RGB JPEG (4:2:0, with ``jpeg_fancy_upsampling`` as
         cps_fast.data.dali asks: libjpeg-turbo's upsampling, PIL's too) and an RGB PNG decoded as
         RGB, a grayscale PNG label (class ids and 255) decoded as GRAY
  mixed  on a GPU (device_id=0): the same JPEG and RGB PNG with the mixed decoder (nvJPEG on the
         GPU for JPEG; PNG is decoded on the host by nvImageCodec, then copied), and the GPU
         operators the pipelines run after it (linear resize of a region, crop_mirror_normalize with
         a mirror; crop, flip and lookup_table on a label) against the same operators on the CPU:
         these run the pack's sm_90 GPU code (prune_fatbin.py blanked the other archs')

A PNG must decode exactly; a JPEG within the tolerances below (the CPU decoder is libjpeg-turbo
like PIL's; nvJPEG's IDCT and colour conversion round differently). GPU and CPU operators on the
same exact input agree to 2 uint8 levels after normalising.

    python benchmarks/gpu/check_dali_pack.py [--site DIR] [--gpu auto|yes|no] [--json PATH]

--site: the folder the pack was unpacked into; nvidia.dali must import from there. --json writes the
checks as a list of rows (run_gpu.sh puts it among the run's results). Exit 0: every check passed;
1: nvidia.dali (or its pytorch plugin) does not import, or not from --site, or --gpu yes without a
GPU; 2: it imports but a check failed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

# |DALI - PIL| in uint8 levels: (max, mean) allowed
JPEG_CPU_TOL = (2, 0.05)  # libjpeg-turbo both: measured 0 on the dev machine
JPEG_GPU_TOL = (12, 1.0)  # nvJPEG against libjpeg-turbo
NORM_STD = 58.0  # the std (in uint8 levels) the normalising checks use
OPS_TOL = 2.0 / NORM_STD  # GPU against CPU operators, after normalising: 2 uint8 levels


def images(seed: int = 0):
    """An RGB scene (smooth gradients, edges and noise: JPEG artefacts show, decoders differ where
    they should not), its JPEG and PNG bytes, and a grayscale label PNG; odd sizes."""
    from PIL import Image

    h, w = 83, 121
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w) + 64], -1)
    rgb[20:50, 30:70] = (230, 40, 30)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    label = rng.integers(0, 21, (h, w)).astype(np.uint8)
    label[::7] = 255
    out = {}
    for name, img, fmt, kw in (("jpeg", rgb, "JPEG", dict(quality=90, subsampling=2)),
                               ("png", rgb, "PNG", {}), ("label", label, "PNG", {})):
        b = io.BytesIO()
        Image.fromarray(img).save(b, format=fmt, **kw)
        out[name] = np.frombuffer(b.getvalue(), np.uint8)
    pil_jpeg = np.array(Image.open(io.BytesIO(out["jpeg"].tobytes())).convert("RGB"))
    return rgb, label, out, pil_jpeg


def compare(name, device, got, want, tol=None) -> dict:
    got, want = np.asarray(got), np.asarray(want)
    row = dict(check=name, device=device, shape=list(got.shape))
    if got.shape != want.shape:
        return dict(row, ok=False, why=f"shape {got.shape}, expected {want.shape}")
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    row.update(max_abs=float(d.max()), mean_abs=float(d.mean()))
    if tol is None:
        row["ok"] = bool(d.max() == 0)
        row["tolerance"] = "exact"
    else:
        row["ok"] = bool(d.max() <= tol[0] and d.mean() <= tol[1])
        row["tolerance"] = f"max <= {tol[0]}, mean <= {tol[1]}"
    return row


def cpu_checks(fn, pipeline_def, types, rgb, label, enc, pil_jpeg) -> list[dict]:
    @pipeline_def(batch_size=2, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        imgs = fn.external_source(source=lambda: [enc["jpeg"], enc["png"]], batch=True)
        labs = fn.external_source(source=lambda: [enc["label"], enc["label"]], batch=True)
        return (fn.decoders.image(imgs, device="cpu", output_type=types.RGB, jpeg_fancy_upsampling=True,
                                  adjust_orientation=False),
                fn.decoders.image(labs, device="cpu", output_type=types.GRAY))

    p = pipe()
    p.build()
    out_img, out_lab = p.run()
    return [compare("jpeg rgb", "cpu", out_img.at(0), pil_jpeg, JPEG_CPU_TOL),
            compare("png rgb", "cpu", out_img.at(1), rgb),
            compare("png gray label", "cpu", out_lab.at(0)[..., 0], label)]


def gpu_checks(fn, pipeline_def, types, rgb, label, enc, pil_jpeg) -> list[dict]:
    rows = []

    @pipeline_def(batch_size=2, num_threads=2, device_id=0, prefetch_queue_depth=1)
    def decode():
        imgs = fn.external_source(source=lambda: [enc["jpeg"], enc["png"]], batch=True)
        return fn.decoders.image(imgs, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True,
                                 adjust_orientation=False)

    p = decode()
    p.build()
    out, = p.run()
    out = out.as_cpu()
    rows.append(compare("jpeg rgb", "mixed", out.at(0), pil_jpeg, JPEG_GPU_TOL))
    rows.append(compare("png rgb", "mixed", out.at(1), rgb))
    try:  # the CPU decoder's JPEG against nvJPEG's: equal would mean the GPU did not decode it
        cpu_decoded = np.asarray(cpu_checks_raw(fn, pipeline_def, types, enc))
        rows[-2]["identical_to_cpu_decoder"] = bool(np.array_equal(np.asarray(out.at(0)), cpu_decoded))
    except Exception as exc:  # informational only
        rows[-2]["identical_to_cpu_decoder"] = f"not compared: {type(exc).__name__}: {exc}"

    # the pipelines' GPU operators against the same operators on the CPU, on the exact PNG input
    (gi, gl), (ci, cl) = run_ops(fn, pipeline_def, types, rgb, label, "gpu"), \
        run_ops(fn, pipeline_def, types, rgb, label, "cpu")
    rows.append(compare("resize+crop_mirror_normalize", "gpu vs cpu", gi, ci, (OPS_TOL, OPS_TOL / 4)))
    rows.append(compare("crop+flip+lookup_table", "gpu vs cpu", gl, cl))
    return rows


def run_ops(fn, pipeline_def, types, rgb, label, device):
    """The resize, crop_mirror_normalize, crop, flip and lookup_table the pipelines run, on ``device``."""
    @pipeline_def(batch_size=1, num_threads=2, device_id=0 if device == "gpu" else None, prefetch_queue_depth=1)
    def pipe():
        img = fn.external_source(source=lambda: [rgb], batch=True, layout="HWC")
        lab = fn.external_source(source=lambda: [label[..., None]], batch=True, layout="HWC")
        if device == "gpu":
            img, lab = img.gpu(), lab.gpu()
        img = fn.resize(img, size=[64, 96], roi_start=[4.0, 6.0], roi_end=[75.0, 110.0],
                        interp_type=types.INTERP_LINEAR, antialias=False)
        img = fn.crop_mirror_normalize(img, crop_h=48, crop_w=80, crop_pos_x=0.3, crop_pos_y=0.6, mirror=1,
                                       mean=[120.0, 110.0, 100.0], std=[NORM_STD] * 3, dtype=types.FLOAT,
                                       output_layout="HWC", out_of_bounds_policy="pad", fill_values=0.0)
        lab = fn.crop(lab, crop_h=70, crop_w=100, crop_pos_x=0.5, crop_pos_y=0.5, out_of_bounds_policy="pad",
                      fill_values=255)
        lab = fn.flip(lab, horizontal=1)
        lab = fn.lookup_table(lab, keys=list(range(256)), values=[(v * 7) % 256 for v in range(256)],
                              default_value=255, dtype=types.UINT8)
        return img, lab

    q = pipe()
    q.build()
    a, b = q.run()
    if device == "gpu":
        a, b = a.as_cpu(), b.as_cpu()
    return np.asarray(a.at(0)), np.asarray(b.at(0))


def cpu_checks_raw(fn, pipeline_def, types, enc):
    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        imgs = fn.external_source(source=lambda: [enc["jpeg"]], batch=True)
        return fn.decoders.image(imgs, device="cpu", output_type=types.RGB, jpeg_fancy_upsampling=True,
                                 adjust_orientation=False)

    p = pipe()
    p.build()
    return p.run()[0].at(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", default=None, help="the folder the pack was unpacked into")
    ap.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                    help="the mixed decoder and GPU operators too (auto: when torch sees a GPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        import nvidia.dali as dali
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import feed_ndarray  # noqa: F401  (the dali-gpu loader's)
    except Exception as exc:
        print(f"check_dali_pack: import nvidia.dali failed: {type(exc).__name__}: {exc}")
        return 1
    where = os.path.realpath(dali.__file__)
    print(f"check_dali_pack: nvidia.dali {dali.__version__} from {os.path.dirname(where)} "
          f"(import {time.perf_counter() - t0:.1f} s)")
    if args.site and not where.startswith(os.path.realpath(args.site) + os.sep):
        print(f"check_dali_pack: nvidia.dali imports from {where}, not from the pack in {args.site} "
              f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')!r})")
        return 1
    import torch

    gpu = args.gpu == "yes" or (args.gpu == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        print("check_dali_pack: --gpu yes, but torch sees no CUDA device")
        return 1
    rgb, label, enc, pil_jpeg = images()
    rows = []
    for name, checks in (("cpu", cpu_checks), ("mixed", gpu_checks if gpu else None)):
        if checks is None:
            print("check_dali_pack: no GPU here: the mixed decoder and the GPU operators were not run")
            continue
        try:
            rows += checks(fn, pipeline_def, types, rgb, label, enc, pil_jpeg)
        except Exception as exc:
            rows.append(dict(check=f"{name} pipelines", device=name, ok=False, why=f"{type(exc).__name__}: {exc}"))
    env = dict(dali=dali.__version__, torch=torch.__version__, python=sys.version.split()[0],
               gpu=torch.cuda.get_device_name(0) if gpu else None, dali_from=os.path.dirname(where))
    for r in rows:
        r.update(env)
        same = r.get("identical_to_cpu_decoder")
        extra = f"  identical to the CPU decoder: {same}" if same is not None else ""
        if "max_abs" in r:
            print(f"  {r['check']:34s} {r['device']:10s} max {r['max_abs']:.3g} mean {r['mean_abs']:.3g} "
                  f"({r['tolerance']}): {'ok' if r['ok'] else 'FAILED'}{extra}")
        else:
            print(f"  {r['check']:34s} {r['device']:10s} FAILED: {r['why']}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    bad = [r for r in rows if not r["ok"]]
    print(f"check_dali_pack: {len(rows) - len(bad)} of {len(rows)} checks passed in {time.perf_counter() - t0:.1f} s")
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
