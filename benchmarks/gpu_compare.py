"""One small classification on NumPy and on CuPy (and CuPy with --tf32): how far apart.

Run by benchmarks/gpu_check.sh; prints one JSON object (also written to ``--json``). With
``--dry`` the "GPU" is the strict CuPy-like test module (tests/strict_xp.py), so the same
code path runs on a machine without a GPU.

Figures: fraction of particles with the same label, the same psi (to one psi step) and the
same shift (to one working pixel) as the NumPy run; the largest difference of the averages
relative to their range; ARI of each run against the simulated truth; seconds per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-particles", type=int, default=2000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--n-classes", type=int, default=8)
    ap.add_argument("--dry", action="store_true", help="the strict test module as the GPU")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from companion.classify import em
    from companion.classify.em import classify
    from companion.metrics import ari
    from companion.params import ClassifyParams
    from companion.simulate import load_truth, simulate
    from companion.sources import open_particles

    if args.dry:
        sys.path.insert(0, str(ROOT / "tests"))
        import strict_xp

        real_select = em.select_device
        em.select_device = lambda name: strict_xp.module if name == "gpu" else real_select(name)
    work = Path(tempfile.mkdtemp(prefix="gpu-compare-"))
    simulate(work / "data", args.n_particles, box=args.box, psize=192.0 / args.box, seed=1,
             progress=False)  # fmt: skip
    particles = open_particles(work / "data" / "particles.star", None)
    t = load_truth(work / "data")
    truth = (t["view"].to_numpy() * 100 + t["state"].to_numpy()).astype(np.int64)
    base = dict(n_classes=args.n_classes, online_iters=4, full_iters=2, seed=2,
                max_resolution=8.0)  # fmt: skip
    runs = {}
    for name, kw in (("cpu", {"device": "cpu"}), ("gpu", {"device": "gpu"}),
                     ("gpu_tf32", {"device": "gpu", "tf32": True})):  # fmt: skip
        t = time.perf_counter()
        res = classify(particles, ClassifyParams(**base, **kw))
        runs[name] = (res, time.perf_counter() - t)
    ref, _ = runs["cpu"]
    psi_step = ClassifyParams(**base).psi_step
    out = {"n_particles": args.n_particles, "box": args.box, "n_classes": args.n_classes,
           "dry": args.dry, "device": {k: r.device for k, (r, _) in runs.items()}}  # fmt: skip
    span = float(np.ptp(ref.averages)) or 1.0
    for name, (res, secs) in runs.items():
        dpsi = np.abs((res.psi_deg - ref.psi_deg + 180.0) % 360.0 - 180.0)
        dshift = np.abs(res.shift_px - ref.shift_px).max(axis=1) if res.shift_px.size else 0
        out[name] = {
            "seconds": round(secs, 2),
            "same_label": float(np.mean(res.class_id == ref.class_id)),
            "same_psi_within_step": float(np.mean(dpsi <= psi_step + 1e-3)),
            "same_shift_within_1px": float(np.mean(dshift <= 1.0 + 1e-3)),
            "averages_max_diff_of_range": float(np.abs(res.averages - ref.averages).max() / span),
            "ari_vs_truth": float(ari(truth, res.class_id)),
        }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = out["gpu"]["same_label"] >= 0.97 and out["gpu"]["averages_max_diff_of_range"] <= 0.02
    print(f"CuPy vs NumPy: {'AGREE' if ok else 'DISAGREE'} (labels ≥ 97% equal, averages "
          "within 2% of their range)", file=sys.stderr)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
