"""How often one run validates its parameters: every validation by the params model (pydantic's
validator of :class:`ClassifyParams`: construction, ``model_validate``, assignment) and every
:meth:`ClassifyParams.check_feasible` (the parameters against N). Counted through those two
public seams, replaced for the duration of a test (``monkeypatch.setattr``) or of a child
process (``install(setattr)``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from companion.params import ClassifyParams


@dataclass
class Counts:
    validated: int = 0
    feasible: int = 0

    def as_tuple(self) -> tuple[int, int]:
        return self.validated, self.feasible


class _CountingValidator:
    """pydantic's SchemaValidator of the model, counting the validations it performs."""

    def __init__(self, inner: Any, counts: Counts) -> None:
        self._inner, self._counts = inner, counts

    def validate_python(self, *args: Any, **kwargs: Any) -> Any:
        self._counts.validated += 1
        return self._inner.validate_python(*args, **kwargs)

    def validate_assignment(self, *args: Any, **kwargs: Any) -> Any:
        self._counts.validated += 1
        return self._inner.validate_assignment(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install(setattr_: Callable[[Any, str, Any], None]) -> Counts:
    """Count from now on; ``setattr_`` is ``monkeypatch.setattr`` (undone after the test) or
    the builtin ``setattr`` (in a child process)."""
    counts = Counts()
    setattr_(
        ClassifyParams,
        "__pydantic_validator__",
        _CountingValidator(ClassifyParams.__pydantic_validator__, counts),
    )
    check = ClassifyParams.check_feasible

    def counted(self: ClassifyParams, n_particles: int) -> None:
        counts.feasible += 1
        check(self, n_particles)

    setattr_(ClassifyParams, "check_feasible", counted)
    return counts
