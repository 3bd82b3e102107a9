"""The EM state after each finished iteration, saved atomically and loaded to resume.

``work_dir/checkpoint/state.npz`` holds every array the next iteration needs plus a JSON
header (parameters, particle fingerprint, history). It is written to a temporary file and
renamed over the previous one, so an interrupted write (Ctrl-C, SIGKILL) leaves the last
complete iteration intact.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from companion.errors import ParameterError
from companion.io.atomic import atomic_write_bytes
from companion.params import SUBCLASSIFY_FIELDS, ClassifyParams

STATE_FILE = "state.npz"
FORMAT = 1
# parameters that may change between a run and its continuation
# (the batch size is saved in the state, so --memory-limit does not change the result)
# (--posteriors changes only what is written: the per-particle arrays follow it, see put)
# (--cluster and its options: where the E-step runs does not change the result)
# (--subclassify*, --stability: they run after the main run)
RESUMABLE_CHANGES = ("device", "memory_limit", "posteriors", "cluster", "cluster_jobs",
                     "cluster_queue", "cluster_walltime", "cluster_timeout",
                     *SUBCLASSIFY_FIELDS, "stability")  # fmt: skip


@dataclass
class EMState:
    """Everything that carries over from one iteration to the next (host arrays)."""

    iteration: int
    refs: np.ndarray  # (K, w, w) float32
    sigma2_init: np.ndarray  # (G, S)
    sigma2_est: np.ndarray  # (G, S)
    sigma2_used: np.ndarray  # (G, S) noise power the last E-step used
    tau2: np.ndarray  # (K, S)
    prior: np.ndarray  # (K,)
    half: np.ndarray  # uint8 (N,)
    # running sufficient statistics (online EM)
    run_num: np.ndarray  # (2, K, F) complex64
    run_den: np.ndarray  # (2, K, F) float32
    run_noise_num: np.ndarray  # (G, S)
    run_noise_den: np.ndarray  # (G, S)
    run_occ: np.ndarray  # (K,)
    run_q: float
    # per-class results of the last M-step
    frc: np.ndarray
    ssnr: np.ndarray
    ref_power: np.ndarray
    resolution: np.ndarray
    acc_rot: np.ndarray
    acc_trans: np.ndarray
    # per-particle results of each particle's latest E-step
    class_id: np.ndarray
    psi: np.ndarray
    shift: np.ndarray  # (N, 2) original px
    max_prob: np.ndarray
    class_prob: np.ndarray
    loglik: np.ndarray
    n_sig: np.ndarray
    class_ess: np.ndarray
    dual: np.ndarray  # (K,) Sinkhorn class prices (balanced mode), else empty
    batch: int
    current_shell: int = 0  # E-step resolution limit (shell) of the next iteration
    group_scale: np.ndarray = field(default_factory=lambda: np.ones(0))  # (G,) per noise row
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    scale: np.ndarray | None = None  # float32 (N,) per-particle scale (None: all 1)
    # optional per-particle outputs (None until an E-step writes them: see put)
    post_class: np.ndarray | None = None  # int32 (N, P) top-P classes, most probable first
    post_prob: np.ndarray | None = None  # float32 (N, P) their posteriors
    post_loglik: np.ndarray | None = None  # float32 (N, P) their log-likelihoods
    image_pow: np.ndarray | None = None  # float32 (N,) CryoSPARC powers of the best pose
    cross_cor: np.ndarray | None = None
    slice_pow: np.ndarray | None = None
    loglik_gain: np.ndarray | None = None  # float32 (N,) loglik minus the empty model's

    def put(self, name: str, rows: Any, values: np.ndarray) -> None:
        """``self.<name>[rows] = values``, allocating an optional per-particle field (or
        re-allocating it when its trailing shape changed) on first use; integer fields of
        particles not written yet hold -1, float fields 0."""
        cur = getattr(self, name)
        values = np.asarray(values)
        if cur is None or cur.shape[1:] != values.shape[1:]:
            fill = -1 if values.dtype.kind in "iu" else 0
            cur = np.full((len(self.class_id), *values.shape[1:]), fill, values.dtype)
            setattr(self, name, cur)
        cur[rows] = values


def comparable_params(params: ClassifyParams) -> dict[str, Any]:
    d = params.resolved()
    for k in RESUMABLE_CHANGES:
        d.pop(k, None)
    return d


def save(ckpt_dir: Path, state: EMState, params: ClassifyParams, fingerprint: str) -> Path:
    """Write ``state`` atomically to ``ckpt_dir/state.npz``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, np.ndarray):
            arrays[f.name] = v
        else:
            scalars[f.name] = v
    header = {
        "format": FORMAT,
        "params": comparable_params(params),
        "fingerprint": fingerprint,
        "scalars": scalars,
    }
    arrays["__header__"] = np.frombuffer(json.dumps(header, default=_json).encode(), np.uint8)
    path = ckpt_dir / STATE_FILE
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getbuffer(), fsync=True)
    return path


def load(ckpt_dir: Path, params: ClassifyParams, fingerprint: str) -> EMState | None:
    """The saved state, or None when there is none; ParameterError when it was made with
    other parameters or other particles."""
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ParameterError(
            f"{path}: unreadable checkpoint ({exc}) — delete it to start again"
        ) from None
    header = json.loads(arrays.pop("__header__").tobytes().decode())
    if header.get("fingerprint") != fingerprint:
        raise ParameterError(
            f"{path}: the checkpoint was made for other particles — use a new output "
            "directory or remove the checkpoint to start again"
        )
    _check_same_params(path, header, params)
    return EMState(**arrays, **header["scalars"])


def check_params(ckpt_dir: Path, params: ClassifyParams) -> None:
    """ParameterError when the checkpoint in ``ckpt_dir`` was made with other parameters
    (cheap: reads only its header; no checkpoint, nothing to check)."""
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        return
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(z["__header__"].tobytes().decode())
    except (OSError, ValueError, KeyError):
        return  # load() reports an unreadable checkpoint
    _check_same_params(path, header, params)


def _check_same_params(path: Path, header: dict[str, Any], params: ClassifyParams) -> None:
    old, new = header.get("params", {}), comparable_params(params)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        what = ", ".join(
            f"--{k.replace('_', '-')} {old.get(k)!r} → {new.get(k)!r}" for k in changed
        )
        raise ParameterError(
            f"{path}: cannot continue with changed parameters ({what}) — run with the "
            "original parameters or start a new run"
        )


def _json(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
