"""Small simulated particle sets for the classifier tests (written as .mrcs stacks).

Each class is a fixed asymmetric 2D density (a few Gaussian blobs). A particle is its class
image rotated counter-clockwise by ``theta`` (content at ``p`` moves to ``R(theta) p`` on
(x = column, y = row), about pixel ``box//2``), then shifted by ``d`` pixels, multiplied by a
CTF and given white noise: ``sqrt(snr) · CTF(image) + noise`` with unit-variance class
images and noise (so ``snr`` is the SNR before the CTF). RELION's convention then expects
``psi = -theta`` (+ a per-class constant) and ``origin = -d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from scipy.ndimage import map_coordinates

from companion.classify.ctf import ctf_2d, rfft_freqs
from companion.particles import CtfParams, ParticleSet


def class_images(n_classes: int, box: int, psize: float, seed: int = 1,
                 diameter_A: float | None = None) -> np.ndarray:  # fmt: skip
    """(K, box, box) float32 asymmetric blob images inside ~70% of the box (or the diameter),
    each centred on its centre of mass."""
    rng = np.random.default_rng(seed)
    c = box // 2
    y, x = np.mgrid[0:box, 0:box] - c
    rad = 0.35 * box if diameter_A is None else 0.5 * diameter_A / psize * 0.8
    out = np.zeros((n_classes, box, box), np.float32)
    for k in range(n_classes):
        img = np.zeros((box, box))
        n_blobs = 4 + k % 3
        for _ in range(n_blobs):
            r = rad * np.sqrt(rng.uniform(0.0, 1.0))
            a = rng.uniform(0, 2 * np.pi)
            bx, by = r * np.cos(a), r * np.sin(a)
            s = rng.uniform(0.06, 0.14) * box
            img += rng.uniform(0.6, 1.2) * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * s * s))
        # centre of mass at the centre, as a particle picker would have it
        w = np.maximum(img, 0)
        cx, cy = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
        img = rotate_shift(img.astype(np.float32), 0.0, (-cx, -cy))
        out[k] = img / img.std()
    return out


def blob_image(w: int) -> np.ndarray:
    """A fixed asymmetric two-blob image (w, w), for unit tests of rotations and shifts."""
    y, x = np.mgrid[0:w, 0:w] - w // 2
    img = np.exp(-((x - 5) ** 2 + (y - 2) ** 2) / 8.0) + 0.5 * np.exp(
        -((x + 4) ** 2 + (y + 6) ** 2) / 20.0
    )
    return img.astype(np.float32)


def rotate_shift(img: np.ndarray, theta_deg: float, d: tuple[float, float]) -> np.ndarray:
    """Content at p moves to R(theta) p + d (about the centre pixel), cubic interpolation."""
    box = img.shape[0]
    c = box // 2
    y, x = np.mgrid[0:box, 0:box].astype(np.float64)
    qx, qy = x - c - d[0], y - c - d[1]
    t = np.deg2rad(theta_deg)
    ox = np.cos(t) * qx + np.sin(t) * qy
    oy = -np.sin(t) * qx + np.cos(t) * qy
    return map_coordinates(img, [oy + c, ox + c], order=3, mode="constant").astype(np.float32)


@dataclass
class SimSet:
    particles: ParticleSet
    labels: np.ndarray
    theta: np.ndarray
    shift: np.ndarray  # (N, 2) px applied to the particle
    refs: np.ndarray


def make_particles(tmp: Path, n: int = 200, n_classes: int = 3, box: int = 48,
                   psize: float = 3.0, snr: float = 0.1, seed: int = 0, max_shift: float = 3.0,
                   rotate: bool = True, ctf: bool = True, defocus: float = 15000.0,
                   premultiplied: bool = False, phase_flipped: bool = False,
                   n_stacks: int = 2, n_optics: int = 1, refs: np.ndarray | None = None,
                   labels: np.ndarray | None = None) -> SimSet:  # fmt: skip
    """Write ``n`` particles to ``tmp`` as .mrcs stacks and return them with the truth."""
    rng = np.random.default_rng(seed)
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    if refs is None:
        refs = class_images(n_classes, box, psize, seed=seed + 101)
    n_classes = refs.shape[0]
    if labels is None:
        labels = rng.integers(0, n_classes, n)
    theta = rng.uniform(0, 360, n) if rotate else np.zeros(n)
    shift = rng.uniform(-max_shift, max_shift, (n, 2))
    du = rng.uniform(0.8, 1.2, n) * defocus
    dv = du - rng.uniform(0, 500, n)
    ang = rng.uniform(0, 180, n)
    kx, ky = rfft_freqs(box, psize)
    imgs = np.empty((n, box, box), np.float32)
    for i in range(n):
        clean = rotate_shift(refs[labels[i]], theta[i], tuple(shift[i]))
        if ctf:
            c = ctf_2d(kx, ky, du[i], dv[i], ang[i], 300.0, 2.7, 0.1)[0]
            f = np.fft.rfft2(np.fft.ifftshift(clean))
            clean = np.fft.fftshift(np.fft.irfft2(f * c, s=(box, box))).astype(np.float32)
        noise = rng.normal(0, 1, (box, box)).astype(np.float32)
        img = clean * np.sqrt(snr) + noise
        if ctf and (premultiplied or phase_flipped):
            c = ctf_2d(kx, ky, du[i], dv[i], ang[i], 300.0, 2.7, 0.1)[0]
            f = np.fft.rfft2(np.fft.ifftshift(img))
            f = f * (c if premultiplied else np.sign(c))
            img = np.fft.fftshift(np.fft.irfft2(f, s=(box, box))).astype(np.float32)
        imgs[i] = img
    stack_of = np.arange(n) % n_stacks
    paths, image_index = [], np.zeros(n, np.int64)
    for s in range(n_stacks):
        sel = np.flatnonzero(stack_of == s)
        path = tmp / f"stack_{s:03d}.mrcs"
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(imgs[sel])
            m.voxel_size = psize
        image_index[sel] = np.arange(len(sel))
        paths.append(path)
    zeros = np.zeros(n)
    cp = CtfParams(
        defocus_u=du if ctf else zeros,
        defocus_v=dv if ctf else zeros,
        defocus_angle=ang,
        voltage=np.full(n, 300.0),
        cs=np.full(n, 2.7 if ctf else 0.0),
        amp_contrast=np.full(n, 0.1 if ctf else 0.0),
        phase_shift=np.zeros(n) if ctf else np.full(n, 90.0),
        bfactor=zeros,
        scale=np.ones(n),
    )
    ps = ParticleSet(
        source_path=tmp / "particles.star",
        project_dir=tmp,
        stack_paths=paths,
        stack_index=stack_of,
        image_index=image_index,
        box=box,
        psize=psize,
        optics_group=(np.arange(n) % n_optics) + 1,
        ctf=cp,
        contrast=1.0,
        ctf_premultiplied=premultiplied,
        phase_flipped=phase_flipped,
        host="relion",
    )
    return SimSet(ps, labels.astype(np.int64), theta, shift, refs)
