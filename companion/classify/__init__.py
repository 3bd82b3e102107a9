"""The 2D classifier: ML, CTF-aware, in-plane rotations and shifts, per-shell noise.

``classify(particles, params, work_dir=..., resume=..., callbacks=...) -> ClassResult``.
"""

from companion.classify.callbacks import Callbacks, IterationInfo
from companion.classify.em import classify
from companion.classify.result import ClassResult

__all__ = ["Callbacks", "ClassResult", "IterationInfo", "classify"]
