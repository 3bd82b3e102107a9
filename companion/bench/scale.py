"""``companion bench scale``: wall time, peak RSS, cache disk use and throughput vs N and K.

One simulated base set (``min(N)`` particles at ``--box``, at most ``--base`` of them) is
tiled to every N (particle i of the tiled set is image ``i mod base``: the same stacks are
read again, so preprocessing and E-step costs are those of N distinct images while the
disk holds one set). Each (N, K) point classifies in a child process (its own peak RSS,
``ru_maxrss``) with the default schedule unless classification options say otherwise.
Finished points are kept in ``OUT/scale.json``; rerunning the same command skips them and
an interrupted point continues from its checkpoint (``--continue``), so a 1M run can be
resumed. After each point the ETA of the rest is printed (time ∝ N·K fitted so far). The
fitted exponents are the least-squares slopes of log time vs log N (at the first K) and vs
log K (at the smallest N). ``--max-iterations`` stops each point early: a memory check at
large N (preprocessing plus the first iterations) when the full schedule would take too long.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

POINTS_FILE = "scale.json"


def _key(n: int, k: int, box: int, overrides: dict[str, Any], max_iterations: int | None) -> str:
    return json.dumps([n, k, box, sorted(overrides.items()), max_iterations])


def base_set(out: Path, n: int, box: int, seed: int) -> Path:
    """The simulated base set in ``out/base`` (made once; reused when present)."""
    from companion.simulate import simulate

    d = out / f"base_{n}_{box}"
    star = d / "particles.star"
    if not star.is_file():
        simulate(d, n, box=box, psize=192.0 / box, seed=seed, formats=("star",))
    return star


def run_point(star: Path, n: int, k: int, work: Path, overrides: dict[str, Any],
              max_iterations: int | None = None) -> dict:  # fmt: skip
    """Classify the base set tiled to ``n`` particles into ``k`` classes in a child
    process (stopping after ``max_iterations`` when given); its wall time, peak RSS and
    cache size."""
    spec = json.dumps({"star": str(star), "n": n, "k": k, "work": str(work),
                       "params": overrides, "max_iterations": max_iterations})  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "companion.bench.scale", spec],
                            stdout=subprocess.PIPE)  # fmt: skip
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench scale point N={n} K={k} failed (exit {proc.returncode})")
    child = json.loads(out.decode().strip().splitlines()[-1])
    child["wall_s"] = wall
    return child


def _child(spec: dict[str, Any]) -> None:
    """In the child: classify, then print JSON (seconds, peak RSS, cache bytes)."""
    import logging

    from companion.classify import classify
    from companion.params import validate_params
    from companion.sources import open_particles

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    base = open_particles(spec["star"])
    n = int(spec["n"])
    ps = base.subset(np.arange(n) % len(base)) if n != len(base) else base
    params = validate_params({"n_classes": spec["k"], "device": "cpu", **spec["params"]})
    cache = Path(spec["work"]) / "checkpoint" / "cache" / "coeffs.c64"
    seen: dict[str, Any] = {"cache_bytes": 0, "preprocess_s": None}
    t0 = time.perf_counter()

    stop_after = spec.get("max_iterations")

    class Hooks:
        iterations = 0

        def on_iteration(self, info: Any) -> None:
            self.iterations += 1

        def should_stop(self) -> bool:
            return stop_after is not None and self.iterations >= stop_after

        def progress(self, done: int, total: int, stage: str) -> None:
            if stage != "preprocess" and seen["preprocess_s"] is None:
                seen["preprocess_s"] = time.perf_counter() - t0
                if cache.is_file():
                    seen["cache_bytes"] = cache.stat().st_blocks * 512

    from companion.errors import Aborted

    hooks = Hooks()
    try:
        iterations = classify(ps, params, work_dir=spec["work"], resume=True,
                              callbacks=hooks).iteration  # fmt: skip
    except Aborted:  # --max-iterations reached
        iterations = hooks.iterations
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": secs, "peak_rss": rss, "cache_bytes": seen["cache_bytes"],
                      "preprocess_s": seen["preprocess_s"], "iterations": iterations,
                      "n": n, "k": int(spec["k"])}))  # fmt: skip


def slope(x: list[float], y: list[float]) -> float | None:
    """Least-squares slope of log y vs log x (None with fewer than 2 distinct x)."""
    if len(set(x)) < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def run_scale_benchmark(out: Path, ns: list[int], ks: list[int], box: int, seed: int,
                        overrides: dict[str, Any], base_max: int,
                        max_iterations: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Every (N, K[0]) point and every (min N, K) point; resumable through ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    points_path = out / POINTS_FILE
    done: dict[str, Any] = json.loads(points_path.read_text()) if points_path.is_file() else {}
    todo = [(n, ks[0]) for n in ns] + [(min(ns), k) for k in ks[1:]]
    star = base_set(out, min(min(ns), base_max), box, seed)
    for i, (n, k) in enumerate(todo):
        key = _key(n, k, box, overrides, max_iterations)
        if key in done:
            continue
        print(f"bench scale: N={n} K={k} box {box} ...", file=sys.stderr)
        tag = hashlib.sha1(key.encode()).hexdigest()[:8]  # one work dir per point and options
        rec = run_point(star, n, k, out / "runs" / f"n{n}_k{k}_{tag}", overrides, max_iterations)
        rec["throughput"] = n / rec["seconds"]
        done[key] = rec
        tmp = points_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        tmp.replace(points_path)
        rate = sum(r["seconds"] for r in done.values()) / sum(
            r["n"] * r["k"] for r in done.values()
        )
        left = sum(
            nn * kk
            for nn, kk in todo[i + 1 :]
            if _key(nn, kk, box, overrides, max_iterations) not in done
        )
        print(f"bench scale: N={n} K={k}: {rec['seconds']:.0f}s, peak RSS "
              f"{rec['peak_rss'] / 2**30:.2f} GiB; ETA of the rest {left * rate / 60:.0f} min",
              file=sys.stderr)  # fmt: skip
    rows = [done[_key(n, k, box, overrides, max_iterations)] for n, k in todo]
    by_n = [r for r in rows if r["k"] == ks[0]]
    by_k = [r for r in rows if r["n"] == min(ns)]
    return {
        "box": box,
        "max_iterations": max_iterations,
        "points": rows,
        "exponent_time_vs_n": slope([r["n"] for r in by_n], [r["seconds"] for r in by_n]),
        "exponent_time_vs_k": slope([r["k"] for r in by_k], [r["seconds"] for r in by_k]),
    }


def format_scale(rep: dict[str, Any]) -> str:
    cut = rep.get("max_iterations")
    what = f", first {cut} iteration(s) only" if cut else ""
    lines = [f"bench scale (box {rep['box']}, CPU{what})",
             f"{'N':>9} {'K':>5} {'wall s':>9} {'prep s':>8} {'peak RSS GiB':>13} "
             f"{'cache GiB':>10} {'particles/s':>12} {'ptcl×class/s':>13}"]  # fmt: skip
    for r in rep["points"]:
        lines.append(
            f"{r['n']:>9} {r['k']:>5} {r['seconds']:>9.1f} {r['preprocess_s'] or 0:>8.1f} "
            f"{r['peak_rss'] / 2**30:>13.2f} {r['cache_bytes'] / 2**30:>10.3f} "
            f"{r['throughput']:>12.1f} {r['throughput'] * r['k']:>13.0f}"
        )

    def fmt(v: float | None) -> str:
        return "n/a (one point)" if v is None or not math.isfinite(v) else f"{v:.2f}"

    lines.append(f"time ∝ N^{fmt(rep['exponent_time_vs_n'])}, "
                 f"time ∝ K^{fmt(rep['exponent_time_vs_k'])}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
