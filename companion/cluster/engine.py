"""The Dask engine: start or join the cluster of ``--cluster`` and run E-step shards there.

Per run the :class:`~companion.classify.estep.RunState` is scattered to every worker once;
per E-step pass the :class:`~companion.classify.estep.IterationState` is scattered
(``broadcast=True``) and one task per shard is submitted. Results are gathered in shard
order and added up by the caller, so the sums do not depend on which worker ran which shard
or when. A worker that dies mid-pass loses only its running shards: the scheduler runs them
again on the others (``distributed.scheduler.allowed-failures`` deaths of one shard end the
run with an error). Workers read their particles from the preprocessing cache in the output
directory, which must therefore be on a file system they share with the client.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from companion.classify.estep import IterationState, RunState, ShardResult
from companion.cluster.spec import ClusterSpec, parse_cluster
from companion.errors import ClusterError

log = logging.getLogger(__name__)

INSTALL = "pip install 'companion[cluster]'"
INSTALL_GPU = "pip install 'companion[cluster-gpu]'"
DEFAULT_JOBS = 2
JOBQUEUE_CONFIG = "~/.config/dask/jobqueue.yaml"
THREADS_ENV = "COMPANION_WORKER_THREADS"


def _task(run: RunState, it: IterationState, idx: np.ndarray) -> ShardResult:
    """One shard on a worker (module-level, so workers import it by name)."""
    from companion.classify.estep import estep_shard

    return estep_shard(run, it, idx)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ClusterError(f"--cluster needs Dask (dask, distributed): {INSTALL}") from None
    return distributed


def jobqueue_kwargs(spec: ClusterSpec, params: Any) -> dict[str, Any]:
    """Keyword arguments of the dask-jobqueue cluster/job class: the CLI's queue and
    walltime over jobqueue.yaml's; one worker process per job unless the file says more."""
    import dask

    kw: dict[str, Any] = {"name": "companion-worker"}
    if params.cluster_queue is not None:
        kw["queue"] = params.cluster_queue
    if params.cluster_walltime is not None:
        kw["walltime"] = params.cluster_walltime
    if dask.config.get(f"jobqueue.{spec.kind}.processes", None) is None:
        kw["processes"] = 1
    return kw


def _jobqueue_class(kind: str) -> Any:
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError(f"--cluster {kind} needs dask-jobqueue: {INSTALL}") from None
    return dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster


def _no_resources(kind: str, exc: Exception) -> ClusterError:
    return ClusterError(
        f"--cluster {kind}: {str(exc).splitlines()[0]} — set cores and memory of the worker "
        f"jobs in {JOBQUEUE_CONFIG} (jobqueue: {kind}: cores: 8, memory: 32GB; see README)"
    )


def job_script(params: Any, scheduler: str = "tcp://scheduler:8786") -> str:
    """The batch script one worker job of ``--cluster slurm|pbs`` would be submitted with
    (nothing is submitted)."""
    spec = parse_cluster(params.cluster)
    if spec.kind not in ("slurm", "pbs"):
        raise ClusterError(f"--cluster {params.cluster}: job scripts are for slurm or pbs")
    cls = _jobqueue_class(spec.kind)
    try:
        job = cls.job_cls(scheduler=scheduler, **jobqueue_kwargs(spec, params))
    except ValueError as exc:
        raise _no_resources(spec.kind, exc) from None
    return job.job_script()


class DaskEngine:
    """Runs the shards of each E-step pass on a Dask cluster (see the module docstring)."""

    def __init__(self, client: Any, cluster: Any, spec: ClusterSpec) -> None:
        self.client, self.cluster, self.spec = client, cluster, spec
        self._run: tuple[str, Any] | None = None

    @classmethod
    def start(cls, params: Any) -> DaskEngine:
        """Start (local, gpus, slurm, pbs) or join (an address) the cluster of
        ``params.cluster`` and wait for its first worker; one-line ClusterError otherwise."""
        spec = parse_cluster(params.cluster)
        distributed = _import_distributed()
        if not log.isEnabledFor(logging.DEBUG):  # Dask's own INFO lines: only with -v
            logging.getLogger("distributed").setLevel(logging.WARNING)
        timeout = float(params.cluster_timeout)
        cluster = None
        try:
            if spec.kind == "address":
                try:
                    client = distributed.Client(spec.address, timeout=timeout)
                except (OSError, TimeoutError) as exc:
                    raise ClusterError(
                        f"--cluster {spec.address}: no Dask scheduler answered within "
                        f"{timeout:.0f}s ({type(exc).__name__}) — start one (dask scheduler) "
                        "or check the address"
                    ) from None
            else:
                cluster = cls._make_cluster(spec, params, distributed)
                client = distributed.Client(cluster, timeout=timeout)
            try:
                client.wait_for_workers(1, timeout=timeout)
            except (TimeoutError, OSError):
                client.close()
                what = "worker job" if spec.kind in ("slurm", "pbs") else "worker"
                raise ClusterError(
                    f"--cluster {params.cluster}: no {what} joined within {timeout:.0f}s — "
                    "raise --cluster-timeout or check the queue (squeue / qstat)"
                ) from None
        except BaseException:
            if cluster is not None:
                cluster.close()
            raise
        eng = cls(client, cluster, spec)
        board = "" if spec.kind in ("local", "gpus") else f" (dashboard {client.dashboard_link})"
        log.info("E-step on %s: %d worker(s)%s", spec.describe(), eng.workers, board)
        return eng

    @staticmethod
    def _make_cluster(spec: ClusterSpec, params: Any, distributed: Any) -> Any:
        import dask

        if spec.kind == "local":
            from companion.threads import available_cores

            n = int(spec.workers or 1)
            # BLAS/FFT threads per worker: the cores shared out (COMPANION_WORKER_THREADS
            # overrides it: bench scale --cluster compares worker counts at equal threads)
            threads = os.environ.get(THREADS_ENV) or str(max(1, available_cores() // n))
            env = {v: threads for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                        "OPENBLAS_NUM_THREADS")}  # fmt: skip
            with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
                return distributed.LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True,
                    dashboard_address=":0", silence_logs=logging.WARNING,
                )  # fmt: skip
        if spec.kind == "gpus":
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                raise ClusterError(f"--cluster gpus needs dask-cuda: {INSTALL_GPU}") from None
            return LocalCUDACluster(threads_per_worker=1, dashboard_address=":0",
                                    silence_logs=logging.WARNING)  # fmt: skip
        cls = _jobqueue_class(spec.kind)
        try:
            cluster = cls(**jobqueue_kwargs(spec, params))
        except ValueError as exc:
            raise _no_resources(spec.kind, exc) from None
        jobs = int(params.cluster_jobs or DEFAULT_JOBS)
        cluster.scale(jobs=jobs)
        log.info("submitted %d worker job(s): %s", jobs, cluster.job_script().splitlines()[1:4])
        return cluster

    @property
    def workers(self) -> int:
        return len(self.client.scheduler_info().get("workers", {}))

    def _run_future(self, run: RunState) -> Any:
        if self._run is None or self._run[0] != run.token:
            fut = self.client.scatter(run, broadcast=True, hash=False)
            self._run = (run.token, fut)
        return self._run[1]

    def map(self, run: RunState, it: IterationState, parts: Sequence[np.ndarray],
            hooks: Any) -> Iterator[ShardResult]:  # fmt: skip
        """Each shard's result, in shard order; ``hooks.before_batch()`` is polled while
        waiting (a stop request cancels the pass)."""
        from distributed import wait

        client = self.client
        run_f = self._run_future(run)
        it_f = client.scatter(it, broadcast=True, hash=False)
        futs = [client.submit(_task, run_f, it_f, part, key=f"estep-{it.key}-{i}", pure=False)
                for i, part in enumerate(parts)]  # fmt: skip
        try:
            for i, f in enumerate(futs):
                while True:
                    try:
                        wait(f, timeout=0.25)
                        break
                    except TimeoutError:
                        hooks.before_batch()
                try:
                    res = f.result()
                except Exception as exc:
                    if type(exc).__name__ == "KilledWorker":
                        raise ClusterError(
                            f"E-step shard {i + 1} of {len(futs)} (iteration {it.iteration}): "
                            f"the workers running it died repeatedly ({exc}) — check their "
                            "memory limit and logs"
                        ) from None
                    raise
                futs[i] = None  # its result is here: the cluster may drop it
                f.release()
                yield res
        finally:
            left = [f for f in futs if f is not None]
            if left:
                client.cancel(left)
            it_f.release()

    def close(self) -> None:
        t0 = time.perf_counter()
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
        log.debug("cluster closed in %.1fs (pid %d)", time.perf_counter() - t0, os.getpid())
