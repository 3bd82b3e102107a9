"""The simulated protein: a rigid domain plus a flexible domain, as 3D Gaussian blobs.

The model is a handful of isotropic 3D Gaussians ("blobs") in units of the box side, so it
scales with the box. The rigid body is an asymmetric cluster; the flexible domain is a short
arm that swings about a hinge. State ``s < n_states - 1`` puts the arm at hinge angle
``hinge_angles(n_states)[s]``; the last state (when ``n_states >= 2``) has the arm missing.

A *view* is a fixed projection direction (ZYZ Euler angles); projecting an isotropic Gaussian
of mass m gives a 2D Gaussian of mass m at the projected centre, so every clean projection is
analytic: no interpolation, and sub-pixel rotations and shifts are exact. Images are rendered
directly in Fourier space (:func:`render_rfft`), separably: per blob one factor along y and
one along x, summed over blobs as a real matrix product.

Geometry (RELION's): x = column, y = row, the image centre is pixel
``(box // 2, box // 2)``. A particle with in-plane angle ``psi`` (degrees, counter-clockwise
in (x, y)) and shift ``(dx, dy)`` pixels holds the reference density moved from ``r`` to
``R(psi) @ r + (dx, dy)`` with ``R = [[cos, -sin], [sin, cos]]``.
"""

from __future__ import annotations

import numpy as np

# Rigid body: (x, y, z) in box units, mass, sigma in box units. A core with three lobes of
# different lengths along x, y and z, so its projections differ clearly by view.
_BODY = np.array(
    [
        (0.00, 0.00, 0.00, 1.20, 0.032),
        (-0.07, 0.00, 0.00, 0.90, 0.028),
        (-0.14, 0.00, 0.00, 0.80, 0.025),
        (-0.20, 0.01, 0.00, 0.60, 0.021),
        (0.00, 0.08, 0.00, 0.80, 0.025),
        (0.01, 0.14, 0.00, 0.50, 0.021),
        (0.00, 0.00, 0.08, 0.70, 0.025),
        (0.04, -0.05, -0.04, 0.35, 0.017),
    ]
)
# Flexible arm, hinged at _HINGE, pointing along +x at hinge angle 0.
_HINGE = np.array([0.09, 0.00, 0.00])
_ARM = np.array(
    [
        (0.04, 0.00, 0.00, 0.70, 0.025),
        (0.10, 0.00, 0.00, 0.60, 0.025),
        (0.16, 0.00, 0.00, 0.50, 0.021),
        (0.17, 0.00, 0.05, 0.35, 0.017),
    ]
)
_HINGE_AXIS = np.array([0.0, 0.2, 1.0]) / np.linalg.norm([0.0, 0.2, 1.0])

# Projection directions (rot, tilt, psi) in degrees, picked greedily from a 30° grid so that
# views differ most from each other (rotation- and shift-invariant correlation of the clean
# projections <= 0.87 for the first four) and each shows the hinge motion.
_VIEWS = [
    (0.0, 0.0, 0.0),
    (330.0, 60.0, 0.0),
    (240.0, 150.0, 0.0),
    (30.0, 60.0, 0.0),
    (120.0, 120.0, 0.0),
    (0.0, 150.0, 0.0),
    (270.0, 60.0, 0.0),
    (120.0, 60.0, 0.0),
]

N_BLOBS = len(_BODY) + len(_ARM)


def hinge_angles(n_states: int) -> np.ndarray:
    """Hinge angles (degrees) of the states that have the flexible arm."""
    n_arm = n_states - 1 if n_states >= 2 else 1
    if n_arm == 1:
        return np.zeros(1)
    return np.linspace(-50.0, 50.0, n_arm)


def state_has_arm(n_states: int) -> np.ndarray:
    """bool[n_states]: False for the state with the flexible domain missing (the last)."""
    has = np.ones(n_states, dtype=bool)
    if n_states >= 2:
        has[-1] = False
    return has


def _rotation(axis: np.ndarray, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def _euler_zyz(rot: float, tilt: float, psi: float) -> np.ndarray:
    z = np.array([0.0, 0.0, 1.0])
    y = np.array([0.0, 1.0, 0.0])
    return _rotation(z, psi) @ _rotation(y, tilt) @ _rotation(z, rot)


def view_matrices(n_views: int) -> np.ndarray:
    """(n_views, 3, 3) rotation matrices: the hand-picked views, then a golden spiral."""
    mats = [_euler_zyz(*v) for v in _VIEWS[:n_views]]
    extra = n_views - len(mats)
    for i in range(extra):  # more views than the table: spread over the sphere
        tilt = np.rad2deg(np.arccos(1 - 2 * (i + 0.5) / extra))
        rot = (i * 137.50776 + 17.0) % 360.0
        mats.append(_euler_zyz(rot, tilt, 0.0))
    return np.array(mats).reshape(n_views, 3, 3)


def model_3d(n_states: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blob centres (n_states, N_BLOBS, 3), masses (n_states, N_BLOBS), sigmas (N_BLOBS,)."""
    angles = hinge_angles(n_states)
    has_arm = state_has_arm(n_states)
    centres = np.empty((n_states, N_BLOBS, 3))
    masses = np.empty((n_states, N_BLOBS))
    nb = len(_BODY)
    for s in range(n_states):
        rot = _rotation(_HINGE_AXIS, angles[min(s, len(angles) - 1)])
        centres[s, :nb] = _BODY[:, :3]
        centres[s, nb:] = _HINGE + _ARM[:, :3] @ rot.T
        masses[s, :nb] = _BODY[:, 3]
        masses[s, nb:] = _ARM[:, 3] if has_arm[s] else 0.0
    sigmas = np.concatenate([_BODY[:, 4], _ARM[:, 4]])
    return centres, masses, sigmas


def blobs_2d(n_views: int, n_states: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projected blobs per (view, state), box units centred on the origin.

    Returns centres (n_views, n_states, N_BLOBS, 2), masses (n_views, n_states, N_BLOBS)
    and sigmas (N_BLOBS,). The 3D model's centre of mass is moved to the origin per
    state-averaged model so particles sit centred in the box.
    """
    centres, masses, sigmas = model_3d(n_states)
    com = (centres[0] * masses[0][:, None]).sum(0) / masses[0].sum()
    centres = centres - com
    mats = view_matrices(n_views)
    proj = np.einsum("vij,sbj->vsbi", mats[:, :2, :], centres)
    return proj, np.broadcast_to(masses, (n_views, *masses.shape)).copy(), sigmas


def arm_blobs_2d(views: np.ndarray, hinge_deg: np.ndarray, n_views: int, n_states: int
                 ) -> np.ndarray:  # fmt: skip
    """(N, len(_ARM), 2) projected arm blobs at per-particle hinge angles ``hinge_deg``, in
    the frame of :func:`blobs_2d` (box units, same centre of mass shift)."""
    centres, masses, _ = model_3d(n_states)
    com = (centres[0] * masses[0][:, None]).sum(0) / masses[0].sum()
    axis = _HINGE_AXIS
    a = np.deg2rad(np.asarray(hinge_deg, dtype=np.float64))[:, None]
    v = _ARM[:, :3][None]  # (1, A, 3), Rodrigues per particle
    kv = np.cross(axis, v)
    rot = v * np.cos(a)[..., None] + kv * np.sin(a)[..., None]
    rot += axis * (v @ axis)[..., None] * (1 - np.cos(a))[..., None]
    arm = _HINGE + rot - com  # (N, A, 3)
    mats = view_matrices(n_views)[np.asarray(views)]  # (N, 3, 3)
    return np.einsum("nij,naj->nai", mats[:, :2, :], arm)


def particle_radius(n_states: int) -> float:
    """Radius (box units) containing every blob to 2.5 sigma, in every state and view."""
    centres, masses, sigmas = model_3d(n_states)
    com = (centres[0] * masses[0][:, None]).sum(0) / masses[0].sum()
    r = np.linalg.norm(centres - com, axis=-1) + 2.5 * sigmas
    return float(r.max())


def sigmas_px(sigmas: np.ndarray, box: int) -> np.ndarray:
    """Blob widths in pixels at ``box``, at least 1 px (so rendering does not alias)."""
    return np.maximum(np.asarray(sigmas) * box, 1.0).astype(np.float32)


def render_rfft(
    centres_px: np.ndarray, masses: np.ndarray, sigmas_px: np.ndarray, n: int
) -> np.ndarray:
    """rfft2 of images made of 2D Gaussian blobs, complex64 (N, n, n // 2 + 1).

    ``centres_px`` (N, B, 2) are (x, y) pixel positions on an n×n grid (pixel 0 at index 0),
    ``masses`` (N, B) the integrated densities, ``sigmas_px`` (B,) or (N, B) the widths.
    Equals the DFT of the sampled (periodically wrapped) Gaussians up to negligible aliasing
    for sigma >= 1 px. Computed separably, F[ky, kx] = sum_b Y_b[ky] X_b[kx], as one real
    batched matrix product whose output interleaves real and imaginary parts.
    """
    n_part, n_blob = masses.shape
    f32 = np.float32
    s = np.broadcast_to(np.asarray(sigmas_px, dtype=f32), (n_part, n_blob))[..., None]
    fy = np.fft.fftfreq(n).astype(f32)  # (n,)
    fx = np.fft.rfftfreq(n).astype(f32)  # (n//2+1,)
    two_pi = f32(2 * np.pi)
    pos = np.asarray(centres_px, dtype=f32)
    ey = np.exp(f32(-0.5) * (two_pi * s * fy) ** 2) * np.asarray(masses, dtype=f32)[..., None]
    ex = np.exp(f32(-0.5) * (two_pi * s * fx) ** 2)  # (N, B, n//2+1)
    py = -two_pi * pos[..., 1:2] * fy
    px = -two_pi * pos[..., 0:1] * fx
    # left (N, n, 2B) = [Re Y, Im Y]; right (N, 2B, nk, 2) gives (Re F, Im F) per kx
    left = np.concatenate([ey * np.cos(py), ey * np.sin(py)], axis=1).transpose(0, 2, 1)
    cx, sx = ex * np.cos(px), ex * np.sin(px)
    right = np.empty((n_part, 2 * n_blob, n // 2 + 1, 2), dtype=f32)
    right[:, :n_blob, :, 0] = cx
    right[:, n_blob:, :, 0] = -sx
    right[:, :n_blob, :, 1] = sx
    right[:, n_blob:, :, 1] = cx
    prod = np.matmul(np.ascontiguousarray(left), right.reshape(n_part, 2 * n_blob, -1))
    return prod.view(np.complex64)


def true_projections(
    box: int, n_views: int = 4, n_states: int = 4, *, fourier: bool = False
) -> np.ndarray:
    """Clean projections (no CTF, no noise; protein white), float32 (n_views, n_states, box, box).

    Centred, psi = 0: what a perfect class average of each (view, state) looks like, for
    comparing class averages with the truth. ``fourier=True`` returns the rfft2 instead.
    """
    centres, masses, sigmas = blobs_2d(n_views, n_states)
    c = centres.reshape(-1, N_BLOBS, 2) * box + box // 2
    f = render_rfft(c, masses.reshape(-1, N_BLOBS), sigmas_px(sigmas, box), box)
    if fourier:
        return f.reshape(n_views, n_states, box, box // 2 + 1)
    img = np.fft.irfft2(f, s=(box, box)).astype(np.float32)
    return img.reshape(n_views, n_states, box, box)
