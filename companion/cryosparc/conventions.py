"""CryoSPARC conventions: the ONE module that knows how CryoSPARC's numbers map to companion's.

Everything else in companion speaks RELION units (see :mod:`companion.particles` and
:mod:`companion.classify.result`); the CryoSPARC reader, writers and the External job convert
here and nowhere else. No CryoSPARC server was available when these rules were written: what
rests on evidence and what was NOT verified is stated for each rule.

Geometry (``alignments2D/pose``, ``alignments2D/shift``)
    RELION (RELION.md, checked on 3.1.3): aligning a particle means shifting it by
    ``+origin`` (pixels = rlnOriginXAngst / psize) and then rotating it by
    ``R(psi) = [[cos psi, -sin psi], [sin psi, cos psi]]`` on (x = column, y = row).

    CryoSPARC rule used here::

        pose  = radians(psi) mod 2*pi          (float32, in [0, 2*pi))
        psi   = degrees(pose)                  (any representative of the angle)
        shift = origin_px * psize / alignments2D/psize_A     (pixels, (x, y), same sign)

    and companion writes ``alignments2D/psize_A = blob/psize_A``, so ``shift = origin_px``.
    Evidence: (a) pyem's ``csparc2star`` (the converter RELION and CryoSPARC users run to move
    2D/3D results between the two) sets ``rlnAnglePsi = degrees(alignments2D/pose)`` and
    ``rlnOriginX/Y = alignments2D/shift`` with no sign change; (b) cryoDRGN reads poses from
    both hosts: a .cs rotation is ``expmap(pose)^T`` and a STAR rotation its
    ``R_from_relion(rot, tilt, psi)``; for an in-plane rotation about z both are
    ``[[cos a, sin a], [-sin a, cos a]]`` with ``a`` = the rotation-vector angle = psi, so the
    senses agree, and it takes ``alignments*/shift`` and ``rlnOriginX/Y`` as the same
    translation; (c) the real CryoSPARC 2D export (data/real/cryosparc_J2_particles_exported.cs)
    has poses in [0, 2*pi) on a 2*pi/49 grid and shifts on a 6-pixel grid with
    ``alignments2D/psize_A == blob/psize_A`` (pixels of the particle box, not of the
    internally downsampled box). NOT verified: that CryoSPARC itself, given images, would align
    a particle with exactly this pose and shift (no server and no images here). A sign error
    would not show in any metadata test; it shows as smeared averages when a downstream
    CryoSPARC job re-averages particles with our poses.

Image contrast (``blob/sign``)
    :class:`~companion.particles.ParticleSet` wants ``contrast``: the factor that turns stored
    pixels into protein-white images (RELION's convention). Rule used here::

        contrast = -blob/sign      (blob/sign -1 -> contrast +1: stored protein white)
        blob/sign = -contrast      (when writing)

    Reasoning: every real CryoSPARC file here carries ``blob/sign = -1``, on stacks CryoSPARC
    extracted itself (J19/extract) and on imported stacks (J1/imported, EMPIAR-10076), and
    Import Particle Stack only links the files another program wrote (protein white after
    RELION's "invert contrast"). One value describing both means CryoSPARC's own stacks have
    the contrast RELION's have, and ``-1`` is CryoSPARC's mark for it (``+1`` then marks
    protein-dark stacks, e.g. negative stain). pyem and cryoDRGN read stacks named by .cs and
    STAR files the same way, with no sign handling, and are used daily on both. The simulator
    writes RELION-style (protein white) stacks once and names them from both particles.star
    and particles.cs: the .cs gets ``blob/sign = -1`` (as CryoSPARC's own import would write)
    and both readers return identical images (the documented sign between formats is +1).
    NOT verified: CRYOSPARC.md reports the opposite belief (CryoSPARC extraction writes
    protein-dark images with sign -1). If that is right, stacks CryoSPARC extracted give
    negative class averages with this rule: pass ``override="dark"`` (stored images protein
    dark) or ``override="sign"`` (contrast = +blob/sign) to :func:`contrast_from_sign`
    (``companion.cryosparc.read_particles(..., contrast=...)``).

Class averages (``template`` output)
    ``alignments2D/class = k`` (0-based, companion's ``class_id``) refers to the template row
    with ``blob/idx = k``: image k (0-based) of ``class_averages.mrc``. Averages are written
    protein white, so their ``blob/sign`` is ``sign_from_contrast(+1) = -1``. NOT verified:
    the sign CryoSPARC expects on templates, and which extra blob fields (``import_sig``)
    Select 2D requires.

Exposure groups
    ``optics_group = ctf/exp_group_id + 1`` (companion's optics groups are 1-based, CryoSPARC's
    exposure groups start at 0 for imports; pyem does the same); inverse on write.

CTF units
    ``ctf/df1_A, df2_A`` = rlnDefocusU, V (Å); ``ctf/df_angle_rad`` = radians(rlnDefocusAngle);
    ``ctf/phase_shift_rad`` = radians(rlnPhaseShift); ``accel_kv``, ``cs_mm``,
    ``amp_contrast``, ``bfactor`` (Å²), ``scale`` as RELION (pyem's mapping).

Powers, scale and effective class count (``alignments2D/image_pow`` ... ``class_ess``)
    Checked on the real 2D export (tests/data/cryosparc_J2_particles_exported.cs, 22 rows):
    ``error = image_pow - cross_cor + slice_pow`` (to 2e-4) and ``alpha_min = cross_cor /
    (2 slice_pow)`` (to 6e-8), i.e. the squared residual ``|X - S|²`` of the best pose, the
    image power ``|X|²``, ``2 Re <X, S>`` and ``|S|²`` (whitened), and the least-squares
    scale of the model S. ``class_ess`` there lies within [1/(p² + (1-p)²), 1/p²] for the
    best class's posterior p on every row and below exp(entropy) on some: it is 1 / Σ p_k²,
    which is what companion writes. ``alpha`` is the per-particle scale applied to the model
    (companion's --scale-correction scale × its group's scale; 1 there); powers are for the
    unscaled model, ``error = image_pow - alpha·cross_cor + alpha²·slice_pow`` (the export
    has alpha = 1 only: the alpha weighting is NOT verified on a real file).

Class posteriors (slot ``posteriors``, companion's own)
    ``posteriors/class_R`` (uint32, 0-based as ``alignments2D/class``), ``posteriors/prob_R``
    and ``posteriors/loglik_R`` (float32) for ranks R = 1..P, most probable first
    (``--posteriors P``). A slot CryoSPARC does not define: cryosparc-tools loads and saves
    it like any other, and Subset Particles by Statistic lists the fields of a particle
    input's slots; NOT verified on a server (none here).

Per-particle features of ``--select auto`` (slot ``select``, companion's own)
    ``select/lowres_power`` and ``select/loglik_gain`` (float32; :mod:`companion.select`),
    read back by ``companion select --classes auto``. Like ``lineage/*`` and
    ``stability/*``, written to the offline ``particles.cs`` only.

``alignments2D/*`` values companion does not compute get neutral values; where CryoSPARC's
own 2D output (the real export) writes 0 we write 0 too. See :data:`ALIGNMENTS2D_FIELDS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from companion.errors import ParameterError

if TYPE_CHECKING:
    from companion.classify.result import ClassResult
    from companion.particles import ParticleSet

TWO_PI = 2.0 * np.pi

# blob/* fields of a particle dataset as CryoSPARC writes them (CRYOSPARC.md; real files).
BLOB_FIELDS: list[tuple[str, str, tuple[int, ...]]] = [
    ("blob/path", "O", ()),
    ("blob/idx", "<u4", ()),
    ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4", ()),
    ("blob/sign", "<f4", ()),
    ("blob/import_sig", "<u8", ()),
]

# ctf/* fields in the order of CryoSPARC's Import Particle Stack output.
CTF_FIELDS: list[tuple[str, str, tuple[int, ...]]] = [
    ("ctf/type", "O", ()),
    ("ctf/exp_group_id", "<u4", ()),
    ("ctf/accel_kv", "<f4", ()),
    ("ctf/cs_mm", "<f4", ()),
    ("ctf/amp_contrast", "<f4", ()),
    ("ctf/df1_A", "<f4", ()),
    ("ctf/df2_A", "<f4", ()),
    ("ctf/df_angle_rad", "<f4", ()),
    ("ctf/phase_shift_rad", "<f4", ()),
    ("ctf/scale", "<f4", ()),
    ("ctf/scale_const", "<f4", ()),
    ("ctf/shift_A", "<f4", (2,)),
    ("ctf/tilt_A", "<f4", (2,)),
    ("ctf/trefoil_A", "<f4", (2,)),
    ("ctf/tetra_A", "<f4", (4,)),
    ("ctf/anisomag", "<f4", (4,)),
    ("ctf/bfactor", "<f4", ()),
]

# alignments2D/* as CryoSPARC 2D classification writes them, in its order, with what
# companion puts there.
ALIGNMENTS2D_FIELDS: list[tuple[str, str, tuple[int, ...], str]] = [
    ("alignments2D/split", "<u4", (), "0, as CryoSPARC's 2D classification writes it"),
    ("alignments2D/shift", "<f4", (2,), "origin in pixels at psize_A (shift_from_origin)"),
    ("alignments2D/pose", "<f4", (), "radians(psi) mod 2pi (pose_from_psi)"),
    ("alignments2D/psize_A", "<f4", (), "particle pixel size (blob/psize_A)"),
    ("alignments2D/error", "<f4", (), "image_pow - a cross_cor + a^2 slice_pow, else -2 loglik"),
    ("alignments2D/error_min", "<f4", (), "0 (CryoSPARC 2D writes 0)"),
    ("alignments2D/resid_pow", "<f4", (), "0 (CryoSPARC 2D writes 0)"),
    ("alignments2D/slice_pow", "<f4", (), "|CTF*ref|^2/sigma^2 of the best pose, else 0"),
    ("alignments2D/image_pow", "<f4", (), "|image|^2/sigma^2, else 0"),
    ("alignments2D/cross_cor", "<f4", (), "2 Re<image, CTF*ref>/sigma^2, else 0"),
    ("alignments2D/alpha", "<f4", (), "per-particle scale a (--scale-correction; else 1)"),
    ("alignments2D/alpha_min", "<f4", (), "cross_cor / (2 slice_pow) if known, else 1"),
    ("alignments2D/weight", "<f4", (), "0 (CryoSPARC 2D writes 0)"),
    ("alignments2D/pose_ess", "<f4", (), "0 (CryoSPARC 2D writes 0)"),
    ("alignments2D/shift_ess", "<f4", (), "0 (CryoSPARC 2D writes 0)"),
    ("alignments2D/class_posterior", "<f4", (), "posterior of the class (ClassResult.class_prob)"),
    ("alignments2D/class", "<u4", (), "0-based class = template blob/idx (idx_from_class)"),
    ("alignments2D/class_ess", "<f4", (), "1 / sum of squared class posteriors (class_ess)"),
]

POSTERIOR_SLOT = "posteriors"
# per rank R (1-based): field name pattern, dtype
POSTERIOR_FIELDS = (("class_{}", "<u4"), ("prob_{}", "<f4"), ("loglik_{}", "<f4"))

CONTRAST_OVERRIDES = ("auto", "white", "dark", "sign")


# ----------------------------------------------------------------------------- geometry


def pose_from_psi(psi_deg: Any) -> np.ndarray:
    """CryoSPARC ``alignments2D/pose`` (float32 radians in [0, 2π)) from RELION psi (degrees)."""
    rad = np.mod(np.radians(np.asarray(psi_deg, dtype=np.float64)), TWO_PI)
    pose = rad.astype(np.float32)
    pose[pose >= np.float32(TWO_PI)] = 0.0  # float32 rounding of values just below 2π
    return pose


def psi_from_pose(pose_rad: Any) -> np.ndarray:
    """RELION psi (float32 degrees, same range as the input) from ``alignments2D/pose``."""
    return np.degrees(np.asarray(pose_rad, dtype=np.float64)).astype(np.float32)


def shift_from_origin(origin_px: Any, psize: Any, align_psize: Any = None) -> np.ndarray:
    """``alignments2D/shift`` (float32 (N, 2) pixels at ``align_psize``) from RELION origins.

    ``origin_px`` is (x, y) in pixels of size ``psize`` (rlnOriginX/YAngst / psize); the sign
    is RELION's. ``align_psize`` defaults to ``psize`` (what companion writes).
    """
    origin = np.asarray(origin_px, dtype=np.float64).reshape(-1, 2)
    psize = np.asarray(psize, dtype=np.float64).reshape(-1, 1)
    align = psize if align_psize is None else np.asarray(align_psize, np.float64).reshape(-1, 1)
    return (origin * (psize / align)).astype(np.float32)


def origin_from_shift(shift: Any, align_psize: Any, psize: Any) -> np.ndarray:
    """RELION origin (float32 (N, 2), pixels of size ``psize``) from ``alignments2D/shift``."""
    s = np.asarray(shift, dtype=np.float64).reshape(-1, 2)
    align = np.asarray(align_psize, dtype=np.float64).reshape(-1, 1)
    psize = np.asarray(psize, dtype=np.float64).reshape(-1, 1)
    return (s * (align / psize)).astype(np.float32)


# ----------------------------------------------------------------------------- contrast


def contrast_from_sign(sign: Any, override: str | float | None = None) -> np.ndarray:
    """ParticleSet ``contrast`` (float32) from ``blob/sign``: ``-sign`` unless overridden.

    ``override``: None or ``"auto"`` (the rule above); ``"white"`` (stored images are protein
    white: contrast +1); ``"dark"`` (protein dark: contrast -1); ``"sign"`` (the other reading
    of blob/sign: contrast = +sign); or a number ±1 used as the contrast itself.
    """
    s = np.asarray(sign, dtype=np.float32)
    if override is None or override == "auto":
        out = np.where(s < 0, np.float32(1.0), np.float32(-1.0))
    elif override == "white":
        out = np.ones_like(s)
    elif override == "dark":
        out = -np.ones_like(s)
    elif override == "sign":
        out = np.where(s < 0, np.float32(-1.0), np.float32(1.0))
    elif isinstance(override, (int, float)) and float(override) in (1.0, -1.0):
        out = np.full_like(s, float(override))
    else:
        raise ParameterError(
            f"contrast override {override!r} is not one of {', '.join(CONTRAST_OVERRIDES)}, "
            "+1 or -1 — say whether the stored particle images show protein white or dark"
        )
    return np.asarray(out, dtype=np.float32)


def sign_from_contrast(contrast: Any) -> np.ndarray:
    """``blob/sign`` (float32) for images whose ParticleSet ``contrast`` is given."""
    c = np.asarray(contrast, dtype=np.float32)
    return np.where(c < 0, np.float32(1.0), np.float32(-1.0)).astype(np.float32)


# ----------------------------------------------------------------------------- indices


def class_from_idx(idx: Any) -> np.ndarray:
    """companion class index (int32, 0-based) from ``alignments2D/class`` / ``blob/idx``."""
    return np.asarray(idx).astype(np.int32)


def idx_from_class(class_id: Any) -> np.ndarray:
    """``alignments2D/class`` and template ``blob/idx`` (uint32) from a 0-based class index."""
    c = np.asarray(class_id)
    if c.size and int(c.min()) < 0:
        raise ValueError("class indices must be >= 0")
    return c.astype(np.uint32)


def optics_group_from_exp_group(exp_group_id: Any) -> np.ndarray:
    """companion optics group (int32, 1-based) from ``ctf/exp_group_id`` (0-based)."""
    return (np.asarray(exp_group_id).astype(np.int64) + 1).astype(np.int32)


def exp_group_from_optics_group(optics_group: Any) -> np.ndarray:
    """``ctf/exp_group_id`` (uint32) from companion's 1-based optics group."""
    return np.maximum(np.asarray(optics_group).astype(np.int64) - 1, 0).astype(np.uint32)


def strip_path_prefix(path: str) -> str:
    """``blob/path`` without CryoSPARC's leading ``>`` (seen in exported datasets)."""
    return path[1:] if path.startswith(">") else path


# ----------------------------------------------------------------------------- units


def deg_from_rad(rad: Any) -> np.ndarray:
    """float32 degrees from radians (float64 in between: off by at most 1 float32 ulp)."""
    return np.degrees(np.asarray(rad, dtype=np.float64)).astype(np.float32)


def rad_from_deg(deg: Any) -> np.ndarray:
    """float32 radians from degrees."""
    return np.radians(np.asarray(deg, dtype=np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------- outputs


def alignments2d_fields(particles: ParticleSet, result: ClassResult) -> dict[str, np.ndarray]:
    """Every ``alignments2D/*`` field (CryoSPARC's dtypes and order) for ``result``.

    Row i describes particle i of ``particles``. Values companion does not compute are the
    neutral values listed in :data:`ALIGNMENTS2D_FIELDS`. If the result carries per-particle
    ``image_pow``, ``cross_cor`` and ``slice_pow`` arrays (optional attributes), they are
    written and ``error`` / ``alpha_min`` follow CryoSPARC's relations, checked on the real
    export: ``error = image_pow - cross_cor + slice_pow``, ``alpha_min = cross_cor /
    (2 slice_pow)``.
    """
    n = len(particles)
    if result.n_particles != n:
        raise ValueError(f"result has {result.n_particles} particles, particle set has {n}")
    psize = np.asarray(particles.psize, dtype=np.float32)
    zeros = np.zeros(n, dtype=np.float32)
    alpha = model_scale(particles, result)
    powers = [getattr(result, name, None) for name in ("image_pow", "cross_cor", "slice_pow")]
    if all(p is not None for p in powers):
        # the result's powers are of the scaled model a·S: CryoSPARC's are of S
        image_pow, cc_scaled, sp_scaled = (np.asarray(p, dtype=np.float64) for p in powers)
        cross_cor, slice_pow = cc_scaled / alpha, sp_scaled / (alpha * alpha)
        error = image_pow - alpha * cross_cor + alpha * alpha * slice_pow
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha_min = np.where(slice_pow > 0, cross_cor / (2 * slice_pow), 1.0)
    else:
        image_pow = cross_cor = slice_pow = zeros
        error = -2.0 * np.asarray(result.loglik, dtype=np.float64)
        alpha_min = np.ones(n)
    values: dict[str, Any] = {
        "alignments2D/split": zeros,  # CryoSPARC's 2D classification writes 0 (no half sets)
        "alignments2D/shift": shift_from_origin(result.shift_px, psize, psize),
        "alignments2D/pose": pose_from_psi(result.psi_deg),
        "alignments2D/psize_A": psize,
        "alignments2D/error": error,
        "alignments2D/error_min": zeros,
        "alignments2D/resid_pow": zeros,
        "alignments2D/slice_pow": slice_pow,
        "alignments2D/image_pow": image_pow,
        "alignments2D/cross_cor": cross_cor,
        "alignments2D/alpha": alpha,
        "alignments2D/alpha_min": alpha_min,
        "alignments2D/weight": zeros,
        "alignments2D/pose_ess": zeros,
        "alignments2D/shift_ess": zeros,
        "alignments2D/class_posterior": np.asarray(result.class_prob),
        "alignments2D/class": idx_from_class(result.class_id),
        "alignments2D/class_ess": np.asarray(result.class_ess),
    }
    return {
        name: np.ascontiguousarray(np.asarray(values[name]).astype(dtype).reshape((n, *shape)))
        for name, dtype, shape, _ in ALIGNMENTS2D_FIELDS
    }


def model_scale(particles: ParticleSet, result: ClassResult) -> np.ndarray:
    """float64 (N,): the scale companion applied to each particle's model (its
    --scale-correction scale × its micrograph group's scale; 1 where not estimated)."""
    n = len(particles)
    scale = np.ones(n)
    if result.scale is not None and result.params.get("scale_correction", "off") == "on":
        scale = scale * np.asarray(result.scale, np.float64)
    group = np.asarray(result.group_scale, np.float64).ravel()
    if group.size == len(particles.group_names) and group.size:
        scale = scale * group[np.asarray(particles.group, np.int64)]
    return scale


def posterior_fields(result: ClassResult) -> dict[str, np.ndarray]:
    """The ``posteriors/*`` fields (see the module doc), in rank order; {} without any."""
    n_top = result.n_posteriors
    if not n_top:
        return {}
    values = (
        np.maximum(np.asarray(result.post_class), 0).astype(np.uint32),
        np.asarray(result.post_prob, np.float32),
        np.asarray(result.post_loglik, np.float32),
    )
    out: dict[str, np.ndarray] = {}
    for r in range(n_top):
        for (pattern, dtype), arr in zip(POSTERIOR_FIELDS, values, strict=True):
            name = f"{POSTERIOR_SLOT}/{pattern.format(r + 1)}"
            out[name] = np.ascontiguousarray(arr[:, r].astype(dtype))
    return out


PARENT_CLASS_FIELD = "lineage/parent_class"
STABILITY_FIELD = "stability/fraction"
#: the per-particle features of --select auto (companion.select), float32
LOWRES_POWER_FIELD = "select/lowres_power"
LOGLIK_GAIN_FIELD = "select/loglik_gain"


def companion_fields(result: ClassResult) -> dict[str, np.ndarray]:
    """companion's own per-particle fields (slots ``select``, ``lineage``, ``stability``):
    the per-particle features of ``--select auto`` (``lowres_power``, ``loglik_gain`` in
    nats; where the result has them), the 0-based main-run class of the particle's class
    (--subclassify) and its stability (--stability)."""
    out: dict[str, np.ndarray] = {}
    for name, values in ((LOWRES_POWER_FIELD, result.lowres_power),
                         (LOGLIK_GAIN_FIELD, result.loglik_gain)):  # fmt: skip
        if values is not None:
            out[name] = np.asarray(values, dtype=np.float32)
    labels = np.asarray(result.class_id, dtype=np.int64)
    if result.parent_class is not None:
        parent = np.asarray(result.parent_class, dtype=np.int64)[np.maximum(labels, 0)]
        out[PARENT_CLASS_FIELD] = parent.astype(np.uint32)
    if result.stability is not None:
        out[STABILITY_FIELD] = np.asarray(result.stability, dtype=np.float32)
    return out


def class_average_fields(result: ClassResult, mrc_path_rel: str, psize: float) -> dict:
    """``blob/*`` fields of the ``class_averages`` template output, one row per class.

    Row k is class k: ``blob/idx = k`` = image k of the stack at ``mrc_path_rel`` (relative
    to the project directory, for a job and offline). ``uid`` is the
    caller's (``job.alloc_output`` makes them; :mod:`companion.cryosparc.outputs` derives them).
    """
    k, ny, nx = result.averages.shape
    return {
        "blob/path": np.array([str(mrc_path_rel)] * k, dtype=object),
        "blob/idx": idx_from_class(np.arange(k)),
        "blob/shape": np.tile(np.array([ny, nx], dtype=np.uint32), (k, 1)),
        "blob/psize_A": np.full(k, psize, dtype=np.float32),
        "blob/sign": sign_from_contrast(np.ones(k, dtype=np.float32)),
    }
