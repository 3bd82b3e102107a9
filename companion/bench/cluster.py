"""``companion bench scale --cluster local:N``: one worker against N on the same data.

The base set of ``bench scale`` (simulated at ``--box``, tiled to the first ``--n-particles``)
is classified three times, each in a child process with a fresh work directory: in one
process without Dask, with ``--cluster local:1`` and with ``--cluster local:N``, every
process (the single one, each worker) with the same BLAS threads, cores // N — so the
speedup is what N workers add over one at equal threads, and the three runs must give
bit-identical results. For ``gpus``, an address or ``slurm``: without Dask and with that
cluster only. Printed per run: wall time (cluster start-up included), the iterations' time,
the speedup over one worker, the overhead per iteration — the E-step's wall time minus its
shards' compute time divided by the workers (scatter, transfers, serialisation, waiting
for the slowest shard) — and whether the labels are identical to the run without Dask.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _child(spec: dict[str, Any]) -> None:
    """In the child: classify, print JSON (seconds, timings, a digest of the labels)."""
    import logging

    import numpy as np

    from companion.classify import classify
    from companion.cluster.engine import THREADS_ENV
    from companion.params import validate_params
    from companion.sources import open_particles
    from companion.threads import limit_threads

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    base = open_particles(spec["star"])
    n = int(spec["n"])
    ps = base.subset(np.arange(n) % len(base)) if n != len(base) else base
    params = validate_params({"n_classes": spec["k"], "device": "cpu", **spec["params"]})
    t0 = time.perf_counter()
    threads = spec.get("threads")
    if threads:
        os.environ[THREADS_ENV] = str(threads)  # the workers of local:N
    with limit_threads(threads):
        r = classify(ps, params, work_dir=spec["work"])
    secs = time.perf_counter() - t0
    t = r.timings
    print(json.dumps({"seconds": secs, "iterations_s": float(sum(t["iterations_s"])),
                      "iterations": len(t["iterations_s"]), "e_step_s": t["e_step_s"],
                      "shard_s": t.get("shard_s", 0.0), "workers": t.get("workers", 1),
                      "labels": hashlib.sha1(r.class_id.tobytes()).hexdigest()}))  # fmt: skip


def _run(star: Path, n: int, k: int, work: Path, params: dict[str, Any],
         threads: int | None) -> dict[str, Any]:  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    spec = json.dumps({"star": str(star), "n": n, "k": k, "work": str(work), "params": params,
                       "threads": threads})  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "companion.bench.cluster", spec],
                          stdout=subprocess.PIPE)  # fmt: skip
    if proc.returncode != 0:
        what = params.get("cluster") or "no cluster"
        raise RuntimeError(f"bench scale --cluster: the run with {what} failed "
                           f"(exit {proc.returncode})")  # fmt: skip
    rec = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return rec


def run_cluster_comparison(out: Path, n: int, k: int, box: int, seed: int,
                           overrides: dict[str, Any], base_max: int) -> dict[str, Any]:  # fmt: skip
    """The runs described in the module docstring; their figures and the speedup."""
    from companion.bench.scale import base_set
    from companion.cluster.spec import parse_cluster

    cluster = str(overrides["cluster"])
    spec = parse_cluster(cluster)
    out.mkdir(parents=True, exist_ok=True)
    star = base_set(out, min(n, base_max), box, seed)
    plain = {key: v for key, v in overrides.items() if not key.startswith("cluster")}
    runs: list[tuple[str, dict[str, Any]]] = [("no Dask", plain)]
    if spec.kind == "local" and (spec.workers or 1) > 1:
        runs.append(("local:1", {**overrides, "cluster": "local:1"}))
    runs.append((cluster, overrides))
    threads = None
    if spec.kind == "local":
        from companion.threads import available_cores

        threads = max(1, available_cores() // int(spec.workers or 1))
    rows = []
    for label, params in runs:
        print(f"bench scale --cluster: N={n} K={k}, {label} ...", file=sys.stderr)
        rec = _run(star, n, k, out / "runs" / f"cluster_{len(rows)}", params, threads)
        rec["threads"] = threads
        it = max(rec["iterations"], 1)
        rec["label"] = label
        compute = rec["shard_s"] / max(rec["workers"], 1)
        rec["overhead_per_iter_s"] = (rec["e_step_s"] - compute) / it
        rows.append(rec)
    one = rows[1] if len(rows) == 3 else rows[0]
    last = rows[-1]
    return {
        "n": n,
        "k": k,
        "box": box,
        "runs": rows,
        "speedup": one["iterations_s"] / max(last["iterations_s"], 1e-9),
        "speedup_wall": one["seconds"] / max(last["seconds"], 1e-9),
        "same_labels": all(r["labels"] == rows[0]["labels"] for r in rows),
    }


def format_cluster(rep: dict[str, Any]) -> str:
    thr = rep["runs"][0].get("threads")
    each = f", {thr} BLAS thread(s) per process" if thr else ""
    lines = [f"bench scale --cluster (N {rep['n']}, K {rep['k']}, box {rep['box']}, CPU{each})",
             f"{'run':>16} {'workers':>8} {'wall s':>8} {'iter s':>8} {'E-step s':>9} "
             f"{'overhead s/iter':>16}"]  # fmt: skip
    for r in rep["runs"]:
        lines.append(f"{r['label']:>16} {r['workers']:>8} {r['seconds']:>8.1f} "
                     f"{r['iterations_s']:>8.1f} {r['e_step_s']:>9.1f} "
                     f"{r['overhead_per_iter_s']:>16.3f}")  # fmt: skip
    base = rep["runs"][1]["label"] if len(rep["runs"]) == 3 else rep["runs"][0]["label"]
    lines.append(f"speedup of {rep['runs'][-1]['label']} over {base}: {rep['speedup']:.2f}x "
                 f"(iterations), {rep['speedup_wall']:.2f}x (wall, start-up included); labels "
                 f"{'identical' if rep['same_labels'] else 'DIFFER'} across runs")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
