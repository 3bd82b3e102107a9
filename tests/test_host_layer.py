"""The host layer's promises that no other test holds: the package metadata accepts exactly
the cryosparc-tools the code accepts, and nothing points outside the repository."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import companion.cryosparc.client as client

REPO = Path(__file__).resolve().parent.parent


def _in_spec(version: str, spec: str) -> bool:
    """``version`` within a ``>=A.B,<C`` style specifier (the forms pyproject uses)."""
    v = tuple(int(x) for x in version.split("."))
    for part in spec.split(","):
        op, bound = re.match(r"\s*(>=|<=|<|>|==)\s*([\d.]+)", part).groups()
        b = tuple(int(x) for x in bound.split("."))
        b += (0,) * (len(v) - len(b))
        if not {">=": v >= b, "<=": v <= b, "<": v < b, ">": v > b, "==": v == b}[op]:
            return False
    return True


def test_pyproject_accepts_the_cryosparc_tools_the_code_accepts(monkeypatch):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [d for d in deps if d.replace("_", "-").startswith("cryosparc-tools")]
    spec = req[len("cryosparc-tools") :].split(";")[0].strip()
    for version in ("4.6.0", "4.7.1", "5.0.0", "5.0.3", "5.9.1", "6.0.0"):
        monkeypatch.setattr(client, "tools_version", lambda v=version: v)
        try:
            client.check_tools()
            accepted = True
        except client.CryoSPARCError:
            accepted = False
        assert accepted == _in_spec(version, spec), (version, spec)


@pytest.mark.parametrize("tree", ["companion", "tests"])
def test_nothing_points_outside_the_repository(tree):
    """Docstrings and tests name no ../shared (the suite runs in a clone with nothing beside it)."""
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in (REPO / tree).rglob("*.py")
        if p.name != "test_host_layer.py"
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\.\./shared|/work/shared", line)
    ]
    assert hits == []
