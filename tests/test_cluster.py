"""--cluster: the E-step on a Dask cluster gives the single-process result.

One ``--cluster local:2`` (2 worker processes, cores // 2 BLAS threads each) serves the
tests; the shards are made small (estep.MIN_SHARD, read on the client only) so every pass
has several shards and both workers get some. The shards' sums are added in shard order on
the client, so with the workers' BLAS thread count (the reference runs under
``limit_threads``) every number is bit-identical. With another thread count BLAS rounds
differently: the same labels, posteriors and averages within ~2e-5 (measured).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from classify_data import make_particles

from companion.classify import Callbacks, classify, estep
from companion.errors import ClusterError, ParameterError
from companion.params import ClassifyParams, validate_params


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return make_particles(tmp_path_factory.mktemp("cl"), n=240, n_classes=3, box=32,
                          psize=4.0, snr=2.0, seed=2)  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """``--cluster local:2`` as classify starts it (DaskEngine.start), shared by the tests
    through its scheduler's address."""
    from companion.cluster.engine import DaskEngine

    eng = DaskEngine.start(ClassifyParams(cluster="local:2"))
    assert eng.workers == 2
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(estep, "MIN_SHARD", 24)


def params(**kw) -> ClassifyParams:
    base = dict(n_classes=3, max_resolution=10.0, online_iters=2, batch_per_class=40,
                full_iters=1, anneal_start=1, anneal_iters=2, seed=1, device="cpu",
                batch_size=24)  # fmt: skip
    return ClassifyParams(**(base | kw))


def one_process(sim, p: ClassifyParams):
    """The single-process reference with the BLAS thread count of a local:2 worker."""
    from companion.threads import available_cores, limit_threads

    with limit_threads(max(1, available_cores() // 2)):
        return classify(sim.particles, p)


def same(a, b) -> None:
    """Bit-identical labels, sizes, posteriors, poses and averages."""
    for name in ("class_id", "class_sizes", "class_prob", "psi_deg", "shift_px", "averages"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("mode", [{}, {"balance": "equal"}])
def test_two_workers_give_the_single_process_result(sim, cluster, mode):
    one = one_process(sim, params(**mode))
    assert len(estep.shards(np.arange(240))) == 10  # several shards per pass
    two = classify(sim.particles, params(cluster=cluster.cluster.scheduler_address, **mode))
    same(one, two)
    if mode:
        assert two.class_sizes.max() <= two.cap


def test_a_worker_killed_mid_iteration_changes_nothing(sim, cluster, tmp_path):
    ref = one_process(sim, params(seed=4))
    client = cluster.client
    before = set(client.run(os.getpid).values())
    killed: list[int] = []

    def progress(done: int, total: int, stage: str) -> None:
        # iteration 3 (the full pass), after its first shard came back
        if stage.startswith("iteration 3/") and done < total and not killed:
            pid = sorted(before)[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    got = classify(sim.particles, params(seed=4, cluster=cluster.cluster.scheduler_address),
                   work_dir=tmp_path, callbacks=Callbacks(progress=progress))  # fmt: skip
    assert killed, "the kill never happened"
    client.wait_for_workers(2, timeout=60)
    after = set(client.run(os.getpid).values())
    assert killed[0] not in after  # the worker really died (its nanny started a new one)
    same(ref, got)


def test_no_dask_without_cluster(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from classify_data import make_particles
        from companion.classify import classify
        from companion.params import ClassifyParams
        import companion.cli
        s = make_particles({str(tmp_path)!r}, n=40, n_classes=2, box=24, psize=4.0, seed=1)
        p = ClassifyParams(n_classes=2, online_iters=0, full_iters=1, max_resolution=12.0,
                           device="cpu")
        classify(s.particles, p)
        ClassifyParams(n_classes=2, cluster="local:2")  # parsing the option imports no Dask
        bad = sorted(m for m in sys.modules if m.split(".")[0] in
                     ("dask", "distributed", "dask_jobqueue", "dask_cuda"))
        print("LOADED", bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


def test_slurm_job_script_carries_the_options():
    import dask
    import dask_jobqueue  # noqa: F401  (first: it registers its config defaults)

    from companion.cluster.engine import job_script

    p = validate_params({"cluster": "slurm", "cluster_queue": "gpu",
                         "cluster_walltime": "02:30:00", "cluster_jobs": 3})  # fmt: skip
    with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.slurm.memory": "32GB",
                          "jobqueue.slurm.account": "cryo"}):  # fmt: skip
        script = job_script(p, "tcp://10.0.0.1:8786")
    assert "#SBATCH -p gpu" in script and "#SBATCH -t 02:30:00" in script
    assert "#SBATCH --cpus-per-task=8" in script and "#SBATCH -A cryo" in script
    assert "tcp://10.0.0.1:8786" in script and "--nthreads 8" in script
    with dask.config.set({"jobqueue.pbs.cores": 4, "jobqueue.pbs.memory": "16GB"}):
        pbs = job_script(validate_params({"cluster": "pbs", "cluster_queue": "long"}))
    assert "#PBS -q long" in pbs
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ClusterError, match="jobqueue.yaml"):
            job_script(p)


def test_bad_values_and_missing_pieces_are_one_line_errors(monkeypatch):
    for bad in ("local", "local:0", "kubernetes", "tcp://"):
        with pytest.raises(ParameterError, match="--cluster"):
            validate_params({"cluster": bad})
    with pytest.raises(ParameterError, match="only used with --cluster slurm"):
        validate_params({"cluster": "local:2", "cluster_jobs": 2})
    with pytest.raises(ClusterError, match="no Dask scheduler answered"):
        from companion.cluster import open_engine

        open_engine(params(cluster="tcp://127.0.0.1:9", cluster_timeout=1.0))
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(ClusterError, match=r"pip install 'companion\[cluster\]'"):
        open_engine(params(cluster="local:2"))


def test_every_host_takes_the_option():
    """The CLI, the RELION External job and the CryoSPARC job build their options from
    ClassifyParams, so --cluster and its options reach the classifier from each."""
    from companion.commands import classify as classify_cmd
    from companion.commands import cryosparc as cs_cmd
    from companion.commands.options import Parser
    from companion.params import params_from_namespace
    from companion.relion.external_job import parse_job_args

    job = parse_job_args(["--o", "External/job009/", "--in_parts", "p.star", "--cluster",
                          "slurm", "--cluster_jobs", "4", "--cluster_queue", "gpu"])  # fmt: skip
    p = validate_params(job.params)
    assert (p.cluster, p.cluster_jobs, p.cluster_queue) == ("slurm", 4, "gpu")
    for add, argv in ((classify_cmd.add_args, ["in.star", "--out", "o"]),
                      (cs_cmd.add_classify_args, ["--project", "P1", "--job", "J2"])):  # fmt: skip
        parser = Parser(prog="t")
        add(parser)
        ns = parser.parse_args([*argv, "--cluster", "local:3", "--cluster-timeout", "60"])
        q = params_from_namespace(ns)
        assert q.cluster == "local:3" and q.cluster_timeout == 60.0
