"""Connect to a CryoSPARC v5 instance through cryosparc-tools and find the source particles.

Every failure a user can fix becomes one :class:`CryoSPARCError` line saying what to do:
the server unreachable or silent, no or wrong credentials, a CryoSPARC whose major.minor
version differs from the installed cryosparc-tools, a cryosparc-tools 4.x install (v4
servers speak JSON-RPC; companion drives the v5 REST API only), an unknown project,
workspace or job, an output that is missing, not particles, unfinished, or lacks the
``blob`` / ``ctf`` slots.

Credentials come from ``CRYOSPARC_EMAIL`` / ``CRYOSPARC_PASSWORD`` or from a login saved by
``python -m cryosparc.tools login --url URL`` — never from a command-line argument.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from companion.errors import InputError

if TYPE_CHECKING:
    from cryosparc.controllers.job import JobController
    from cryosparc.controllers.project import ProjectController
    from cryosparc.tools import CryoSPARC

REQUIRED_SLOTS = ("blob", "ctf")
TOOLS_MAJOR = 5
LOGIN_HINT = "python -m cryosparc.tools login --url {url}"


class CryoSPARCError(InputError):
    """A problem with the CryoSPARC connection, credentials, version or source job."""


@dataclass
class Source:
    """The particles to classify: project, job and output, as found on the server."""

    cs: CryoSPARC
    url: str
    project: ProjectController
    job: JobController
    output: str
    workspace_uid: str
    n_particles: int

    @property
    def label(self) -> str:
        return f"{self.project.uid} {self.job.uid}.{self.output}"


def tools_version() -> str:
    """The installed cryosparc-tools version (``cryosparc.__version__``)."""
    import cryosparc

    return str(getattr(cryosparc, "__version__", "0"))


def major_minor(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of ``"5.0.3"`` or ``"v5.0.3+250101"``; None if not a version."""
    m = re.match(r"^v?(\d+)\.(\d+)", version.strip())
    return (int(m[1]), int(m[2])) if m else None


def check_tools() -> None:
    """Refuse a cryosparc-tools other than 5.x (4.x talks JSON-RPC to CryoSPARC v4)."""
    version = tools_version()
    mm = major_minor(version)
    if mm is None or mm[0] != TOOLS_MAJOR:
        raise CryoSPARCError(
            f"cryosparc-tools {version} is installed; companion's CryoSPARC job needs "
            f"cryosparc-tools {TOOLS_MAJOR}.x and a CryoSPARC v{TOOLS_MAJOR} server — install "
            f"'cryosparc-tools~={TOOLS_MAJOR}.0' matching your server, or (CryoSPARC v4) export "
            "the particles and run `companion classify particles.cs` offline"
        )


def normalise_url(url: str | None) -> str:
    """``--url`` or ``$CRYOSPARC_BASE_URL``, with a scheme and no trailing slash."""
    url = (url or os.environ.get("CRYOSPARC_BASE_URL") or "").strip()
    if not url:
        raise CryoSPARCError(
            "no CryoSPARC address: pass --url (the address you open in a browser, e.g. "
            "http://cryosparc.example.org:39000) or set CRYOSPARC_BASE_URL"
        )
    if not re.match(r"^https?://", url):
        url = "http://" + url
    return url.rstrip("/")


def api_detail(exc: BaseException) -> str:
    """The server's message from an ``APIError`` (FastAPI ``detail``) or the exception text."""
    data = getattr(exc, "data", None)
    if isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        if isinstance(detail, list):  # validation errors
            detail = "; ".join(
                str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail
            )
        return str(detail)
    code = getattr(exc, "code", None)
    if code is not None:
        return f"HTTP {code}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def transport_problem(exc: BaseException, url: str, timeout: float | None = None) -> str | None:
    """A one-line description if ``exc`` (or its cause) is a network failure, else None."""
    import httpx

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, httpx.TimeoutException):
            limit = f" within {timeout:g} s" if timeout else ""
            return f"CryoSPARC at {url} did not answer{limit} ({type(exc).__name__})"
        if isinstance(exc, httpx.TransportError):
            reason = str(exc) or type(exc).__name__
            return f"cannot reach CryoSPARC at {url} ({reason})"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def connect(url: str | None, *, timeout: float = 300.0) -> tuple[CryoSPARC, str]:
    """Log in and check versions; returns the session and the normalised URL."""
    check_tools()
    url = normalise_url(url)
    email = os.environ.get("CRYOSPARC_EMAIL") or None
    password = os.environ.get("CRYOSPARC_PASSWORD") or None
    from cryosparc.errors import APIError
    from cryosparc.tools import CryoSPARC

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the client's retry and version warnings
            cs = CryoSPARC(
                url,
                host=None,
                base_port=None,
                email=email,
                password=password,
                timeout=timeout,  # type: ignore[arg-type]
            )
    except ValueError as exc:  # no password and no saved login (raised before any request)
        raise CryoSPARCError(
            f"no CryoSPARC login for {url}: set CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD in the "
            f"environment or run `{LOGIN_HINT.format(url=url)}` once"
        ) from exc
    except RuntimeError as exc:
        cause = exc.__cause__
        net = transport_problem(exc, url, timeout)
        if net:
            raise CryoSPARCError(
                f"{net} — check --url (the address you open in a browser) and that CryoSPARC "
                "is running and reachable from this machine"
            ) from exc
        if isinstance(cause, APIError) and cause.code in (401, 403):
            who = email or "the saved login"
            fix = (
                "check CRYOSPARC_EMAIL / CRYOSPARC_PASSWORD"
                if password
                else f"run `{LOGIN_HINT.format(url=url)}` again (the saved token may have expired)"
            )
            raise CryoSPARCError(
                f"CryoSPARC at {url} rejected the login for {who} ({api_detail(cause)}) — {fix}"
            ) from exc
        if isinstance(cause, APIError):
            raise CryoSPARCError(
                f"CryoSPARC at {url} answered {api_detail(cause)} while logging in — check "
                "--url and that it is a CryoSPARC v5 instance"
            ) from exc
        raise CryoSPARCError(
            f"no CryoSPARC v{TOOLS_MAJOR} API at {url}/api/cmd ({_short(cause or exc)}) — "
            "check --url (the web-app address, e.g. http://host:39000); CryoSPARC v4 servers "
            f"are not supported (they need cryosparc-tools 4.x)"
        ) from exc
    check_server_version(cs, url)
    return cs, url


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def check_server_version(cs: CryoSPARC, url: str) -> str:
    """Raise when the server's major.minor differs from cryosparc-tools'; returns it."""
    server = str(call(cs.api.config.get_version, url=url, what="reading the version"))
    tools = tools_version()
    s_mm, t_mm = major_minor(server), major_minor(tools)
    if s_mm is not None and t_mm is not None and s_mm != t_mm:
        raise CryoSPARCError(
            f"CryoSPARC at {url} is {server} but cryosparc-tools is {tools} — install the "
            f"matching client: pip install 'cryosparc-tools~={s_mm[0]}.{s_mm[1]}.0'"
        )
    return server


def call(fn: Any, *args: Any, url: str, what: str, **kwargs: Any) -> Any:
    """Call the API; network failures and server errors become one-line CryoSPARCErrors."""
    from cryosparc.errors import APIError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except APIError as exc:
        raise CryoSPARCError(f"CryoSPARC at {url} refused {what}: {api_detail(exc)}") from exc
    except Exception as exc:
        net = transport_problem(exc, url)
        if net:
            raise CryoSPARCError(f"{net} while {what}") from exc
        raise


def uid(value: str, prefix: str, option: str) -> str:
    """``P3`` / ``J42`` / ``W1`` from ``p3``, ``3``, ... ; ParameterError-like otherwise."""
    v = str(value).strip().upper()
    if v.isdigit():
        v = prefix + v
    if not re.fullmatch(rf"{prefix}\d+", v):
        raise CryoSPARCError(f"{option} {value!r} is not a CryoSPARC uid like {prefix}3")
    return v


def find_source(cs: CryoSPARC, url: str, project_uid: str, job_uid: str,
                output: str = "particles") -> Source:  # fmt: skip
    """The project, the job and its particle output; checks everything the job will need."""
    puid = uid(project_uid, "P", "--project")
    juid = uid(job_uid, "J", "--job")
    project = _look_up(
        cs.find_project, (puid,), url, f"project {puid}",
        lambda d: f"project {puid} not found on CryoSPARC at {url} (or not shared with this "
        f"user: {d}) — check --project",
        refused=f"CryoSPARC at {url} refused project {puid}",
    )  # fmt: skip
    job = _look_up(
        project.find_job, (juid,), url, f"job {puid}-{juid}",
        lambda d: f"job {juid} not found in project {puid} ({d}) — check --job",
        refused=f"CryoSPARC at {url} refused job {puid}-{juid}",
    )  # fmt: skip
    outputs = job.model.spec.outputs.root
    particle_outputs = [k for k, o in outputs.items() if o.type == "particle"]
    if output not in outputs:
        have = ", ".join(particle_outputs) or "none"
        raise CryoSPARCError(
            f"job {puid}-{juid} ({job.model.spec.type}) has no output {output!r}; its particle "
            f"outputs: {have} — pick one with --output"
        )
    out = outputs[output]
    if out.type != "particle":
        raise CryoSPARCError(
            f"output {output!r} of {puid}-{juid} holds {out.type}s, not particles — pick a "
            f"particle output with --output ({', '.join(particle_outputs) or 'none'})"
        )
    if job.model.status != "completed":
        raise CryoSPARCError(
            f"job {puid}-{juid} is {job.model.status}, not completed — wait until it completes "
            "(or pick a completed job)"
        )
    slots = {r.name for r in out.results}
    missing = [s for s in REQUIRED_SLOTS if s not in slots]
    if missing:
        raise CryoSPARCError(
            f"output {output!r} of {puid}-{juid} has no {' or '.join(missing)} slot (it has "
            f"{', '.join(sorted(slots)) or 'none'}) — classify particles with images and CTF, "
            "e.g. the output of Extract From Micrographs, Import Particles or a 2D/3D job"
        )
    n = int(out.num_items or 0)
    if n == 0 and out.results:
        n = int(max((r.num_items[-1] if r.num_items else 0) for r in out.results))
    workspaces = list(job.model.workspace_uids or [])
    return Source(
        cs=cs,
        url=url,
        project=project,
        job=job,
        output=output,
        workspace_uid=workspaces[0] if workspaces else "W1",
        n_particles=n,
    )


def check_workspace(source: Source, workspace_uid: str) -> str:
    """``--workspace`` checked on the server; returns the normalised uid."""
    wuid = uid(workspace_uid, "W", "--workspace")
    _look_up(
        source.cs.api.workspaces.find_one, (source.project.uid, wuid), source.url,
        f"workspace {wuid}",
        lambda d: f"workspace {wuid} not found in project {source.project.uid} ({d}) — check "
        f"--workspace or leave it out to use the source job's workspace ({source.workspace_uid})",
        refused=f"CryoSPARC refused workspace {wuid}",
    )  # fmt: skip
    return wuid


def _look_up(fn: Any, args: tuple[Any, ...], url: str, what: str,
             not_found: Any, *, refused: str) -> Any:  # fmt: skip
    """``fn(*args)``; CryoSPARCError ``not_found(detail)`` for a 403/404, ``refused: detail``
    for another API error, the network problem while looking up ``what``."""
    from cryosparc.errors import APIError

    try:
        return _quiet(fn, *args)
    except APIError as exc:
        if exc.code in (403, 404):
            raise CryoSPARCError(not_found(api_detail(exc))) from exc
        raise CryoSPARCError(f"{refused}: {api_detail(exc)}") from exc
    except Exception as exc:
        _reraise_network(exc, url, f"looking up {what}")


def _quiet(fn: Any, *args: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def _reraise_network(exc: Exception, url: str, what: str) -> None:
    net = transport_problem(exc, url)
    if net:
        raise CryoSPARCError(f"{net} while {what}") from exc
    raise exc
