"""Hooks a caller passes to :func:`companion.classify.classify` (all optional)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from companion.classify.result import ClassResult


@dataclass
class IterationInfo:
    """What one finished iteration did (passed to ``Callbacks.on_iteration``)."""

    iteration: int  # 1-based
    n_iterations: int
    stage: str  # "online" or "full"
    n_particles: int  # particles in this iteration's E-step
    uncertainty: float  # the uncertainty factor u used
    noise: str  # noise power used: "initial", "residual" or "white" (see schedule.py)
    resolution_A: float  # median per-class FRC-0.143 resolution (Å; inf if undetermined)
    class_sizes: np.ndarray  # int64[K] hard assignments in this iteration's E-step
    class_distribution: np.ndarray  # float32[K] soft class occupancy after the M-step
    avg_pmax: float
    loglik: float  # mean per-particle log-likelihood contribution
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "stage": self.stage,
            "n_particles": self.n_particles,
            "uncertainty": self.uncertainty,
            "noise": self.noise,
            "resolution_A": self.resolution_A,
            "class_sizes": [int(x) for x in self.class_sizes],
            "class_distribution": [float(x) for x in self.class_distribution],
            "avg_pmax": self.avg_pmax,
            "loglik": self.loglik,
            "seconds": self.seconds,
            **self.extra,
        }


@dataclass
class Callbacks:
    """Optional hooks. ``should_stop`` is polled between batches and iterations: when it
    returns True the run raises :class:`companion.errors.Aborted` with the last complete
    iteration's checkpoint on disk. ``progress(done, total, stage)`` reports particles done
    in the current stage; ``intermediate(iteration, result)`` receives a full
    :class:`ClassResult` after every iteration (per-particle values are each particle's most
    recent E-step; particles an online iteration has not seen yet have ``class_id == -1``).
    """

    on_iteration: Callable[[IterationInfo], None] | None = None
    should_stop: Callable[[], bool] | None = None
    progress: Callable[[int, int, str], None] | None = None
    intermediate: Callable[[int, ClassResult], None] | None = None


def call(callbacks: Any, name: str, *args: Any) -> Any:
    """Call ``callbacks.name(*args)`` when the hook exists (any object with the attribute)."""
    fn = getattr(callbacks, name, None) if callbacks is not None else None
    return fn(*args) if fn is not None else None


def stop_requested(callbacks: Any) -> bool:
    return bool(call(callbacks, "should_stop"))
