"""The stand-in's source particles: a simulated set, laid out as a CryoSPARC project holds it.

``make_particles(project_dir, ...)`` runs :func:`companion.simulate.simulate` with the project
directory as its output (``particles.cs`` + ``stacks/mic_NNNNN.mrcs``, ``blob/path`` relative
to the project) and returns the Dataset a source job serves, made to look like an Extract
job's output: a ``location`` slot besides ``blob`` and ``ctf`` (passthrough the External job
must keep) and CryoSPARC's ``>`` prefix on the paths of the first stack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cryosparc.dataset import Dataset

from companion.simulate import load_truth, simulate

from .state import SLOT_FIELDS


def make_particles(
    project_dir: Path, n: int = 60, box: int = 32, n_stacks: int = 3, psize: float = 4.0,
    snr: float = 1.0, seed: int = 0,
) -> tuple[Dataset, object]:  # fmt: skip
    """Simulate ``n`` particles in ``n_stacks`` stacks; returns (Dataset, truth table)."""
    per_mic = -(-n // n_stacks)
    simulate(project_dir, n, box=box, psize=psize, snr=snr, seed=seed, per_micrograph=per_mic,
             formats=("cs",), progress=False)  # fmt: skip
    dset = Dataset.load(project_dir / "particles.cs")
    loc = [(f"location/{suffix}", *_dtype(dt)) for suffix, dt in SLOT_FIELDS["location"]]
    dset.add_fields(loc)
    paths = np.asarray(dset["blob/path"], dtype=object)
    first = paths == paths[0]
    paths[first] = [">" + p for p in paths[first]]
    dset["blob/path"] = paths
    stacks, stack_of = np.unique(paths, return_inverse=True)
    rng = np.random.default_rng(seed)
    dset["location/micrograph_uid"] = stack_of.astype(np.uint64) + 1000
    dset["location/micrograph_path"] = np.array(
        [f"J1/motioncorrected/mic_{s:05d}.mrc" for s in stack_of], dtype=object
    )
    dset["location/micrograph_shape"] = np.tile(np.array([4096, 4096], np.uint32), (n, 1))
    dset["location/center_x_frac"] = rng.uniform(0.05, 0.95, n).astype(np.float32)
    dset["location/center_y_frac"] = rng.uniform(0.05, 0.95, n).astype(np.float32)
    assert len(stacks) == n_stacks
    return dset, load_truth(project_dir)


def _dtype(dt: str) -> tuple:
    d = np.dtype(dt)
    return (d.base.str, d.shape) if d.shape else (d.str,)
