"""``companion bench modes`` on a tiny simulated set: the table and the cap promise."""

from __future__ import annotations

import json
import math

from companion.bench.modes import MODES, format_modes, run_modes_benchmark
from companion.cli import main

SHORT = {"online_iters": 4, "full_iters": 1, "batch_per_class": 40, "max_resolution": 12.0}


def test_modes_table_and_caps(tmp_path):
    n, k = 300, 6
    rows = run_modes_benchmark(tmp_path, n=n, k_values=(k,), seed=1, box=48, params=SHORT)
    assert [r["mode"] for r in rows] == list(MODES)
    for r in rows:
        assert r["k"] == k and r["n"] == n
        for key in ("nmi", "state_purity", "junk_recall", "junk_in_good_classes"):
            assert 0.0 <= r[key] <= 1.0 or math.isnan(r[key])
        assert -1.0 <= r["ari"] <= 1.0
        assert 0 < r["largest_class_fraction"] <= 1 and r["wall_s"] > 0
        balanced = r["mode"].startswith("balanced")
        assert (r["cap"] is not None) == balanced
        if balanced:  # the cap is a promise, and equal classes leave none nearly empty
            assert r["cap"] == math.ceil(n / k)
            assert r["largest_class"] <= r["cap"] and r["cap_respected"]
            assert r["classes_below_10pct"] == 0
        assert r["params"]["anneal"] == ("off" if "anneal-off" in r["mode"] else "on")
    text = format_modes(rows)
    assert len(text.splitlines()) == len(rows) + 3
    assert (tmp_path / "data" / "particles.star").exists()


def test_bench_modes_command(tmp_path, capsys):
    table = tmp_path / "modes.json"
    rc = main(["bench", "modes", "--n-particles", "160", "--n-classes", "4", "--box", "48",
               "--modes", "balanced", "--table", str(table), "--json"])  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(table.read_text())
    (row,) = printed
    assert row["mode"] == "balanced" and row["largest_class"] <= row["cap"] == 40


def test_bench_modes_set_applies_to_every_mode(tmp_path, capsys):
    table = tmp_path / "modes.json"
    rc = main(["bench", "modes", "--n-particles", "120", "--n-classes", "4", "--box", "48",
               "--modes", "default", "anneal-off", "--set", "noise_model=white",
               "--set", "online-iters=2", "--table", str(table)])  # fmt: skip
    assert rc == 0
    rows = json.loads(table.read_text())
    assert [r["params"]["noise_model"] for r in rows] == ["white", "white"]
    assert [r["params"]["online_iters"] for r in rows] == [2, 2]
    assert [r["params"]["anneal"] for r in rows] == ["on", "off"]  # the modes' own win
    assert "noise_model=white" in capsys.readouterr().out


def test_bench_modes_set_rejects_unknown_names_before_work(tmp_path, capsys):
    rc = main(["bench", "modes", "--set", "noise=white", "--table", str(tmp_path / "t.json")])
    assert rc == 2 and not (tmp_path / "t.json").exists()
    assert "no classification parameter 'noise'" in capsys.readouterr().err


def _fake(mode, noise, seed, k, rec, good):
    keys = ("nmi", "ari", "state_purity", "largest_class_fraction", "classes_below_10pct")
    return {"mode": mode, "k": k, "junk_recall": rec, "junk_in_good_classes": good,
            "data": {"noise": noise, "seed": seed}, **dict.fromkeys(keys, 0.5)}  # fmt: skip


def test_medians_and_the_anneal_verdict_per_cell():
    from companion.bench.modes import anneal_cells, format_summary, medians

    rows = [_fake("default", "white", s, 24, 0.5, 0.06) for s in (0, 1, 2)]
    rows += [_fake("anneal-off", "white", s, 24, r, g)
             for s, r, g in ((0, 0.7, 0.03), (1, 0.4, 0.03), (2, 0.9, 0.01))]  # fmt: skip
    m = {(x["mode"], x["noise"]): x for x in medians(rows)}
    assert m[("anneal-off", "white")]["junk_recall"] == 0.7
    assert m[("anneal-off", "white")]["junk_recall_range"] == [0.4, 0.9]
    assert m[("anneal-off", "white")]["seeds"] == [0, 1, 2]
    cells = anneal_cells(rows)
    assert [c["better"] for c in cells] == [True, False, True]
    text = format_summary(rows)
    assert "2 of 3" in text and "not in white seed 1 K 24" in text


def test_bench_modes_noise_and_seeds(tmp_path, capsys):
    table = tmp_path / "modes.json"
    rc = main(["bench", "modes", "--n", "120", "--classes", "4", "--box", "48",
               "--modes", "default", "--noise", "white", "coloured", "--seed", "0", "1",
               "--set", "online-iters=2", "--table", str(table)])  # fmt: skip
    assert rc == 0
    rows = json.loads(table.read_text())
    assert [(r["data"]["noise"], r["data"]["seed"]) for r in rows] == [
        ("white", 0),
        ("white", 1),
        ("coloured", 0),
        ("coloured", 1),
    ]
    assert "median over seeds" in capsys.readouterr().out


def test_cells_in_two_processes_give_the_rows_of_one(tmp_path):
    """``--jobs 2`` (one process per mode, one BLAS thread each) changes the wall time only:
    the same rows in the same (seed, K, mode) order as one process running every mode."""
    from companion.bench.modes import run_modes_cells

    kw = {"n": 120, "k_values": (3,), "box": 32, "params": SHORT, "device": "cpu"}
    modes = ["default", "balanced"]
    one = run_modes_cells((0, 1), modes=modes, jobs=1, threads=1, **kw)
    two = run_modes_cells((0, 1), modes=modes, jobs=2, threads=1, out_dir=tmp_path, **kw)
    keys = ("mode", "k", "classes_per_state", "largest_class", "junk_recall", "state_purity")
    assert [(r["data"]["seed"],) + tuple(r[k] for k in keys) for r in two] == \
        [(r["data"]["seed"],) + tuple(r[k] for k in keys) for r in one]  # fmt: skip
    assert [r["data"]["seed"] for r in one] == [0, 0, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "white_seed0_balanced", "white_seed0_default", "white_seed1_balanced",
        "white_seed1_default"]  # fmt: skip


def test_bench_modes_jobs_must_be_positive(capsys):
    assert main(["bench", "modes", "--n-particles", "120", "--jobs", "0"]) != 0
    assert "--jobs 0" in capsys.readouterr().err
