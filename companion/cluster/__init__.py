"""Running the E-step on a Dask cluster (``--cluster``).

:mod:`.spec` parses the option (no Dask import); :mod:`.engine` starts or joins the cluster
and runs the E-step shards of :mod:`companion.classify.estep` there. Nothing here imports
Dask until :func:`open_engine` is called, so a run without ``--cluster`` never loads it.
"""

from __future__ import annotations

from typing import Any


def open_engine(params: Any) -> Any:
    """The Dask engine for ``params.cluster`` (see :class:`.engine.DaskEngine`)."""
    from companion.cluster.engine import DaskEngine

    return DaskEngine.start(params)
