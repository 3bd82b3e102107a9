"""CryoSPARC host package: ``.cs`` particle datasets in and out, 2D outputs, conventions.

Nothing outside ``companion.cryosparc`` (and ``jobs/``) knows a ``blob/*``, ``ctf/*`` or
``alignments2D/*`` field; :mod:`companion.cryosparc.conventions` owns the unit and sign rules.
"""

from companion.cryosparc.conventions import (
    alignments2d_fields,
    class_average_fields,
    contrast_from_sign,
    sign_from_contrast,
)
from companion.cryosparc.dataset_io import inspect_particles, read_particles, write_particles
from companion.cryosparc.outputs import write_class2d_outputs

__all__ = [
    "alignments2d_fields",
    "class_average_fields",
    "contrast_from_sign",
    "inspect_particles",
    "read_particles",
    "sign_from_contrast",
    "write_class2d_outputs",
    "write_particles",
]
