"""The host allocator policy: applied once, and left alone when asked."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

CODE = (
    "from companion.classify import hostmem as h; a = h.tune_allocator(); "
    "print(a, h.tune_allocator() is a)"
)


def _run(env_extra: dict[str, str]) -> str:
    env = dict(os.environ) | env_extra
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    return out.stdout.strip()


def test_tuned_on_glibc_and_idempotent():
    got = _run({"COMPANION_MALLOC": ""})
    expect = "True True" if platform.libc_ver()[0] == "glibc" else "False True"
    assert got == expect


def test_system_allocator_on_request():
    assert _run({"COMPANION_MALLOC": "system"}) == "False True"
