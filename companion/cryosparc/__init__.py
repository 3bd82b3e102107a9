"""CryoSPARC host package: ``.cs`` particle datasets in and out, 2D outputs, conventions.

Nothing outside ``companion.cryosparc`` knows a ``blob/*``, ``ctf/*`` or
``alignments2D/*`` field; :mod:`companion.cryosparc.conventions` owns the unit and sign rules.
The names load on first use (``python -m companion.cryosparc.external_job`` imports this
package before its own code runs).
"""

from __future__ import annotations

from companion.lazy import lazy_getattr

_EXPORTS = {
    "alignments2d_fields": "companion.cryosparc.conventions",
    "class_average_fields": "companion.cryosparc.conventions",
    "contrast_from_sign": "companion.cryosparc.conventions",
    "sign_from_contrast": "companion.cryosparc.conventions",
    "inspect_particles": "companion.cryosparc.dataset_io",
    "read_particles": "companion.cryosparc.dataset_io",
    "write_particles": "companion.cryosparc.dataset_io",
    "write_class2d_outputs": "companion.cryosparc.outputs",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
