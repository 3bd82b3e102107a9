"""``companion bench scale``: time (wall and CPU), peak RSS, cache disk use and throughput
vs N and K.

One simulated base set (``min(N)`` particles at ``--box``, at most ``--base`` of them) is
tiled to every N (particle i of the tiled set is image ``i mod base``: the same stacks are
read again, so preprocessing and E-step costs are those of N distinct images while the
disk holds one set). Each (N, K) point classifies in a child process (its own peak RSS,
``ru_maxrss``) with the default schedule unless classification options say otherwise.

Times are measured per stage — preprocessing, online iterations, full passes, and the rest
(set-up, the result) — as wall seconds and as the child's CPU seconds (user + system, all
its threads: on a shared machine wall time measures the other users too). Finished points
are kept in ``OUT/scale.json``; rerunning the same command skips them, and an interrupted
point continues from its checkpoint with its times so far (``bench_times.json`` in its work
directory: the work of a killed segment after its last record is done again and counted
once), so a 1M run can be resumed. The child prints its progress with the ETA of the stage
it is in; after each point the ETA of the rest is printed. The fitted exponents are the
least-squares slopes of log CPU seconds (and wall) vs log N (at the first K) and vs log K
(at the smallest N). ``--max-iterations`` stops each point early: a memory check at large N
(preprocessing plus the first iterations) when the full schedule would take too long.
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
TIMES_FILE = "bench_times.json"  # in a point's work directory: its times so far
STAGES = ("preprocess", "online", "full", "other")
RECORD_EVERY_S = 10.0  # preprocessing times are recorded at most this often
REPORT_EVERY_S = 60.0  # progress lines (with the stage's ETA) at most this often


def _key(n: int, k: int, box: int, overrides: dict[str, Any], max_iterations: int | None,
         threads: int | None = None) -> str:  # fmt: skip
    parts: list[Any] = [n, k, box, sorted(overrides.items()), max_iterations]
    return json.dumps(parts if threads is None else [*parts, {"threads": threads}])


def base_set(out: Path, n: int, box: int, seed: int) -> Path:
    """The simulated base set in ``out/base`` (made once; reused when present)."""
    from companion.simulate import simulate

    d = out / f"base_{n}_{box}"
    star = d / "particles.star"
    if not star.is_file():
        simulate(d, n, box=box, psize=192.0 / box, seed=seed, formats=("star",))
    return star


def run_point(star: Path, n: int, k: int, work: Path, overrides: dict[str, Any],
              max_iterations: int | None = None, threads: int | None = None) -> dict:  # fmt: skip
    """Classify the base set tiled to ``n`` particles into ``k`` classes in a child
    process (stopping after ``max_iterations`` when given, with ``threads`` CPU threads);
    its times per stage, peak RSS and cache size."""
    spec = json.dumps({"star": str(star), "n": n, "k": k, "work": str(work),
                       "params": overrides, "max_iterations": max_iterations,
                       "threads": threads})  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "companion.bench.scale", spec],
                            stdout=subprocess.PIPE)  # fmt: skip
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench scale point N={n} K={k} failed (exit {proc.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


class _Clock:
    """Wall and CPU seconds per stage of one point, carried over resumed segments."""

    def __init__(self, path: Path) -> None:
        self.path = path
        blank = {"wall": dict.fromkeys(STAGES, 0.0), "cpu": dict.fromkeys(STAGES, 0.0),
                 "segments": 0, "peak_rss": 0, "cache_bytes": 0}  # fmt: skip
        self.acc = json.loads(path.read_text()) if path.is_file() else blank
        self.acc["segments"] += 1
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def mark(self, stage: str) -> None:
        """Charge the time since the last mark to ``stage`` and record it."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.acc["wall"][stage] += wall - self.wall0
        self.acc["cpu"][stage] += cpu - self.cpu0
        self.wall0, self.cpu0 = wall, cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.acc["peak_rss"] = max(self.acc["peak_rss"], rss)
        from companion.io.atomic import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.acc))

    def since_mark(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def _child(spec: dict[str, Any]) -> None:
    """In the child: classify, then print JSON (times per stage, peak RSS, cache bytes)."""
    import logging

    from companion.classify import classify
    from companion.errors import Aborted
    from companion.params import validate_params
    from companion.sources import open_particles
    from companion.threads import limit_threads

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    clock = _Clock(work / TIMES_FILE)  # reading the particles counts as preprocessing
    base = open_particles(spec["star"])
    n, k = int(spec["n"]), int(spec["k"])
    ps = base.subset(np.arange(n) % len(base)) if n != len(base) else base
    params = validate_params({"n_classes": k, "device": "cpu", **spec["params"]})
    cache = work / "checkpoint" / "cache" / "coeffs.c64"
    stop_after = spec.get("max_iterations")
    total_its = params.online_iters + params.full_iters

    class Hooks:
        iterations = 0
        last_record = last_report = time.perf_counter()
        current = ""  # the progress stage being reported ("preprocess", "iteration 3/22")
        stage_start: tuple[float, int] = (0.0, 0)

        def on_iteration(self, info: Any) -> None:
            self.iterations += 1
            clock.mark(info.stage)
            wall, cpu = clock.acc["wall"][info.stage], clock.acc["cpu"][info.stage]
            print(f"bench scale: N={n} K={k}: iteration {info.iteration}/{total_its} "
                  f"({info.stage}) done; {info.stage} so far {wall:.0f} s wall, "
                  f"{cpu:.0f} s CPU", file=sys.stderr)  # fmt: skip

        def should_stop(self) -> bool:
            return stop_after is not None and self.iterations >= stop_after

        def progress(self, done: int, total: int, stage: str) -> None:
            now = time.perf_counter()
            if stage != self.current:
                self.current, self.stage_start = stage, (now, done)
            if stage == "preprocess":
                if done >= total or now - self.last_record >= RECORD_EVERY_S:
                    clock.mark("preprocess")
                    self.last_record = now
                if done >= total and cache.is_file():
                    clock.acc["cache_bytes"] = cache.stat().st_blocks * 512
                    clock.mark("preprocess")
            elif clock.acc["cache_bytes"] == 0 and cache.is_file():  # preprocessed earlier
                clock.acc["cache_bytes"] = cache.stat().st_blocks * 512
            if now - self.last_report >= REPORT_EVERY_S:
                self.last_report = now
                t0, d0 = self.stage_start
                rate = (done - d0) / max(now - t0, 1e-9)
                eta = f", ETA of this stage {(total - done) / rate / 60:.0f} min" if rate else ""
                # CPU seconds since the last record: within an iteration, that iteration's
                cpu = clock.since_mark()[1]
                print(f"bench scale: N={n} K={k}: {stage} {done}/{total}{eta} "
                      f"({cpu:.0f} s CPU since the last record)", file=sys.stderr)  # fmt: skip

    hooks = Hooks()
    with limit_threads(spec.get("threads")):
        try:
            iterations = classify(ps, params, work_dir=work, resume=True,
                                  callbacks=hooks).iteration  # fmt: skip
        except Aborted:  # --max-iterations reached
            iterations = hooks.iterations
    clock.mark("other")
    acc = clock.acc
    print(json.dumps({
        "n": n, "k": k, "iterations": iterations, "segments": acc["segments"],
        "wall_s": sum(acc["wall"].values()), "cpu_s": sum(acc["cpu"].values()),
        "stages": {s: {"wall_s": acc["wall"][s], "cpu_s": acc["cpu"][s]} for s in STAGES},
        "peak_rss": acc["peak_rss"], "cache_bytes": acc["cache_bytes"],
    }))  # fmt: skip


def slope(x: list[float], y: list[float]) -> float | None:
    """Least-squares slope of log y vs log x (None with fewer than 2 distinct x or a
    non-positive y)."""
    if len(set(x)) < 2 or min(y, default=0.0) <= 0:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def exponents(rows: list[dict[str, Any]], var: str) -> dict[str, float | None]:
    """Fitted exponents of CPU seconds (total and per stage) and wall seconds vs ``var``."""
    x = [r[var] for r in rows]
    out = {"cpu": slope(x, [r["cpu_s"] for r in rows]),
           "wall": slope(x, [r["wall_s"] for r in rows])}  # fmt: skip
    for s in STAGES[:3]:
        out[s] = slope(x, [r["stages"][s]["cpu_s"] for r in rows])
    return out


def run_scale_benchmark(out: Path, ns: list[int], ks: list[int], box: int, seed: int,
                        overrides: dict[str, Any], base_max: int,
                        max_iterations: int | None = None,
                        threads: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Every (N, K[0]) point and every (min N, K) point; resumable through ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    points_path = out / POINTS_FILE
    done: dict[str, Any] = json.loads(points_path.read_text()) if points_path.is_file() else {}
    done = {key: r for key, r in done.items() if "cpu_s" in r}  # older records: measure again
    todo = [(n, ks[0]) for n in ns] + [(min(ns), k) for k in ks[1:]]
    star = base_set(out, min(min(ns), base_max), box, seed)
    for i, (n, k) in enumerate(todo):
        key = _key(n, k, box, overrides, max_iterations, threads)
        if key in done:
            continue
        print(f"bench scale: N={n} K={k} box {box} ...", file=sys.stderr)
        tag = hashlib.sha1(key.encode()).hexdigest()[:8]  # one work dir per point and options
        rec = run_point(star, n, k, out / "runs" / f"n{n}_k{k}_{tag}", overrides,
                        max_iterations, threads)  # fmt: skip
        rec["throughput"] = n / rec["wall_s"]
        rec["throughput_cpu"] = n / rec["cpu_s"]
        done[key] = rec
        from companion.io.atomic import atomic_write_text

        atomic_write_text(points_path, json.dumps(done, indent=1))
        rate = sum(r["wall_s"] for r in done.values()) / sum(r["n"] * r["k"] for r in done.values())
        left = sum(
            nn * kk
            for nn, kk in todo[i + 1 :]
            if _key(nn, kk, box, overrides, max_iterations, threads) not in done
        )
        print(f"bench scale: N={n} K={k}: {rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s "
              f"CPU, peak RSS {rec['peak_rss'] / 2**30:.2f} GiB; ETA of the rest "
              f"{left * rate / 60:.0f} min (time ∝ N·K)", file=sys.stderr)  # fmt: skip
    rows = [done[_key(n, k, box, overrides, max_iterations, threads)] for n, k in todo]
    by_n = [r for r in rows if r["k"] == ks[0]]
    by_k = [r for r in rows if r["n"] == min(ns)]
    ex_n, ex_k = exponents(by_n, "n"), exponents(by_k, "k")
    return {
        "box": box,
        "max_iterations": max_iterations,
        "threads": threads,
        "points": rows,
        "exponent_time_vs_n": ex_n["cpu"],
        "exponent_time_vs_k": ex_k["cpu"],
        "exponents_vs_n": ex_n,
        "exponents_vs_k": ex_k,
    }


def format_scale(rep: dict[str, Any]) -> str:
    """The table: one row per point, then the fitted exponents."""
    cut = rep.get("max_iterations")
    what = f", first {cut} iteration(s) only" if cut else ""
    thr = f", {rep['threads']} thread(s)" if rep.get("threads") else ""
    lines = [f"bench scale (box {rep['box']}, CPU{thr}{what}; CPU s = process user+system)",
             f"{'N':>9} {'K':>4} {'wall s':>8} {'CPU s':>8} {'prep CPU':>9} {'online CPU':>10} "
             f"{'full CPU':>9} {'peak RSS GiB':>12} {'cache GiB':>9} {'ptcl/CPU s':>10} "
             f"{'ptcl×K/CPU s':>12}"]  # fmt: skip
    for r in rep["points"]:
        st = r["stages"]
        lines.append(
            f"{r['n']:>9} {r['k']:>4} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
            f"{st['preprocess']['cpu_s']:>9.1f} {st['online']['cpu_s']:>10.1f} "
            f"{st['full']['cpu_s']:>9.1f} {r['peak_rss'] / 2**30:>12.2f} "
            f"{r['cache_bytes'] / 2**30:>9.3f} {r['throughput_cpu']:>10.1f} "
            f"{r['throughput_cpu'] * r['k']:>12.0f}"
        )

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"

    for var, ex in (("N", rep["exponents_vs_n"]), ("K", rep["exponents_vs_k"])):
        lines.append(f"CPU time ∝ {var}^{fmt(ex['cpu'])} (wall {var}^{fmt(ex['wall'])}; "
                     f"preprocess {var}^{fmt(ex['preprocess'])}, online {var}^"
                     f"{fmt(ex['online'])}, full passes {var}^{fmt(ex['full'])})")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
