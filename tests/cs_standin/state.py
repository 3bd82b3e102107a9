"""In-memory state of the stand-in CryoSPARC instance and the operations on it.

Responses are built from cryosparc-tools' own pydantic models (``cryosparc.models``), so
what the client decodes is exactly what it would decode from a real server. The rules
enforced here are the ones CryoSPARC enforces and the External-job workflow depends on:
a bearer token on every call, 404 for unknown projects/workspaces/jobs/outputs, inputs
connected only to outputs that have results and carry the required slots, outputs added
only to External (``snowflake``) jobs that are not finished, ``save_output`` only while the
job is running or waiting and only with every field of the output's own slots, uids of a
passthrough output drawn from its input, and passthrough slots joined from the connected
input when an output is loaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from cryosparc.dataset import CSDAT_FORMAT, Dataset
from cryosparc.models.asset import GridFSAsset
from cryosparc.models.auth import Token
from cryosparc.models.event import CheckpointEvent, ImageEvent, TextEvent
from cryosparc.models.job import Job, RunError
from cryosparc.models.job_spec import (
    Connection,
    Input,
    InputResult,
    InputSlot,
    InputSpec,
    JobSpec,
    Output,
    OutputResult,
    OutputSlot,
    OutputSpec,
)
from cryosparc.models.project import Project
from cryosparc.models.resource import ResourceSpec
from cryosparc.models.user import Email, User
from cryosparc.models.workspace import Workspace

# Fields CryoSPARC defines for each slot type (suffix, dtype string as the server sends it).
SLOT_FIELDS: dict[str, list[tuple[str, str]]] = {
    "blob": [
        ("path", "|O"),
        ("idx", "<u4"),
        ("shape", "<2u4"),
        ("psize_A", "<f4"),
        ("sign", "<f4"),
        ("import_sig", "<u8"),
    ],
    "ctf": [
        ("type", "|O"),
        ("exp_group_id", "<u4"),
        ("accel_kv", "<f4"),
        ("cs_mm", "<f4"),
        ("amp_contrast", "<f4"),
        ("df1_A", "<f4"),
        ("df2_A", "<f4"),
        ("df_angle_rad", "<f4"),
        ("phase_shift_rad", "<f4"),
        ("scale", "<f4"),
        ("scale_const", "<f4"),
        ("shift_A", "<2f4"),
        ("tilt_A", "<2f4"),
        ("trefoil_A", "<2f4"),
        ("tetra_A", "<4f4"),
        ("anisomag", "<4f4"),
        ("bfactor", "<f4"),
    ],
    "alignments2D": [
        ("split", "<u4"),
        ("shift", "<2f4"),
        ("pose", "<f4"),
        ("psize_A", "<f4"),
        ("error", "<f4"),
        ("error_min", "<f4"),
        ("resid_pow", "<f4"),
        ("slice_pow", "<f4"),
        ("image_pow", "<f4"),
        ("cross_cor", "<f4"),
        ("alpha", "<f4"),
        ("alpha_min", "<f4"),
        ("weight", "<f4"),
        ("pose_ess", "<f4"),
        ("shift_ess", "<f4"),
        ("class_posterior", "<f4"),
        ("class", "<u4"),
        ("class_ess", "<f4"),
    ],
    "location": [
        ("micrograph_uid", "<u8"),
        ("exp_group_id", "<u4"),
        ("micrograph_path", "|O"),
        ("micrograph_shape", "<2u4"),
        ("micrograph_psize_A", "<f4"),
        ("center_x_frac", "<f4"),
        ("center_y_frac", "<f4"),
    ],
}

FINISHED = ("completed", "failed", "killed")
STATUS_NUM = {
    s: i
    for i, s in enumerate(
        [
            "building",
            "queued",
            "launched",
            "started",
            "running",
            "waiting",
            "completed",
            "killed",
            "failed",
        ]
    )
}
ASSET_TYPES = {
    "png": "image/png",
    "pdf": "application/pdf",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "svg": "image/svg+xml",
    "txt": "text/plain",
    "csv": "text/csv",
    "json": "application/json",
    "html": "text/html",
    "xml": "application/xml",
}


class HTTPError(Exception):
    """An error answered as ``{"detail": ...}`` with this status (FastAPI's shape)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def oid() -> str:
    return secrets.token_hex(12)


@dataclass
class Asset:
    info: GridFSAsset
    data: bytes
    project_uid: str
    job_uid: str


@dataclass
class State:
    """Users, projects, workspaces, jobs, output datasets, events and assets."""

    root: Path  # parent of the simulated project directories
    version: str = "v5.0.3"
    users: dict[str, tuple[str, User]] = field(default_factory=dict)  # email -> (sha256, user)
    tokens: dict[str, str] = field(default_factory=dict)  # token -> email
    projects: dict[str, Project] = field(default_factory=dict)
    workspaces: dict[tuple[str, str], Workspace] = field(default_factory=dict)
    jobs: dict[tuple[str, str], Job] = field(default_factory=dict)
    datasets: dict[tuple[str, str, str], Dataset] = field(default_factory=dict)
    events: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    assets: dict[str, Asset] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    # ---------------------------------------------------------------- seeding (tests)
    def add_user(self, email: str, password: str, name: str = "Test User") -> User:
        first, _, last = name.partition(" ")
        user = User(
            _id=oid(),
            name=name,
            first_name=first,
            last_name=last or first,
            emails=[Email(address=email, verified=True)],
            roles={"default": ["user"]},
        )
        self.users[email] = (hashlib.sha256(password.encode()).hexdigest(), user)
        return user

    def add_project(self, uid: str, title: str = "Test project") -> Path:
        project_dir = self.root / f"CS-{uid.lower()}"
        project_dir.mkdir(parents=True, exist_ok=True)
        owner = next(iter(self.users.values()))[1].id if self.users else oid()
        self.projects[uid] = Project(
            _id=oid(),
            uid=uid,
            project_dir=str(project_dir),
            owner_user_id=owner,
            title=title,
            size_last_updated=now(),
            uid_num=int(uid[1:]),
        )
        return project_dir

    def add_workspace(self, project_uid: str, uid: str, title: str = "Workspace") -> None:
        self.workspaces[(project_uid, uid)] = Workspace(
            _id=oid(),
            uid=uid,
            project_uid=project_uid,
            workspace_type="base",
            title=title,
            uid_num=int(uid[1:]),
            project_uid_num=int(project_uid[1:]),
        )

    def add_source_job(
        self,
        project_uid: str,
        workspace_uid: str,
        dset: Dataset,
        *,
        output: str = "particles",
        job_type: str = "extract_micrographs_multi",
        status: str = "completed",
        title: str = "Extract from micrographs",
    ) -> str:
        """A finished job whose ``output`` holds ``dset`` (one result per field prefix)."""
        job = self._new_job(project_uid, workspace_uid, job_type, title)
        uid = job.uid
        results = []
        for prefix in dset.prefixes():
            results.append(
                OutputResult(
                    name=prefix,
                    dtype=prefix,
                    versions=[0],
                    metafiles=[f"{uid}/{output}.cs"],
                    num_items=[len(dset)],
                )
            )
        job.spec.outputs.root[output] = Output(
            type="particle",
            title=output.replace("_", " ").title(),
            slots=[OutputSlot(name=p, dtype=p) for p in dset.prefixes()],
            results=results,
            num_items=len(dset),
        )
        self._set_status(job, status)
        self.datasets[(project_uid, uid, output)] = dset
        job_dir = Path(self.projects[project_uid].project_dir) / uid
        job_dir.mkdir(exist_ok=True)
        dset.save(job_dir / f"{output}.cs")
        return uid

    # ---------------------------------------------------------------- helpers
    def project(self, puid: str) -> Project:
        if puid not in self.projects:
            raise HTTPError(404, f"Project {puid} not found")
        return self.projects[puid]

    def job(self, puid: str, juid: str) -> Job:
        self.project(puid)
        if (puid, juid) not in self.jobs:
            raise HTTPError(404, f"Job {puid}-{juid} not found")
        return self.jobs[(puid, juid)]

    def project_path(self, puid: str, path: str) -> Path:
        pdir = Path(self.project(puid).project_dir)
        p = Path(path) if Path(path).is_absolute() else pdir / path
        p = Path(str(PurePosixPath(p)))
        if pdir.resolve() not in (p.resolve(), *p.resolve().parents):
            raise HTTPError(403, f"Path {path} is outside the project directory")
        return p

    def _new_job(self, puid: str, wuid: str, job_type: str, title: str) -> Job:
        self.project(puid)
        if (puid, wuid) not in self.workspaces:
            raise HTTPError(404, f"Workspace {puid}-{wuid} not found")
        num = 1 + max((int(j[1:]) for p, j in self.jobs if p == puid), default=0)
        uid = f"J{num}"
        job = Job(
            _id=oid(),
            uid=uid,
            project_uid=puid,
            workspace_uids=[wuid],
            spec=JobSpec(
                type=job_type, ui_tile_width=1, ui_tile_height=1, resource_spec=ResourceSpec()
            ),
            job_dir=uid,
            job_dir_size_last_updated=now(),
            title=title,
            uid_num=num,
            project_uid_num=int(puid[1:]),
            status_num=0,
            build_errors=[],
            created_at=now(),
            updated_at=now(),
        )
        (Path(self.projects[puid].project_dir) / uid).mkdir(exist_ok=True)
        self.jobs[(puid, uid)] = job
        self.events[(puid, uid)] = []
        return job

    def _set_status(self, job: Job, status: str) -> None:
        job.status = status  # type: ignore[assignment]
        job.status_num = STATUS_NUM[status]
        job.updated_at = now()
        if status in ("running", "completed", "failed", "waiting"):
            setattr(job, f"{status}_at", now())

    def _external(self, puid: str, juid: str) -> Job:
        job = self.job(puid, juid)
        if job.spec.type != "snowflake":
            raise HTTPError(400, f"Job {puid}-{juid} is not an External job")
        return job

    def _input_dataset(self, job: Job, input_name: str, slots: Any) -> Dataset:
        inp = job.spec.inputs.root.get(input_name)
        if inp is None:
            raise HTTPError(404, f"Job {job.project_uid}-{job.uid} has no input {input_name}")
        if not inp.connections:
            raise HTTPError(422, f"Input {input_name} of {job.uid} is not connected")
        parts = []
        for conn in inp.connections:
            src = self.job(job.project_uid, conn.job_uid)
            available = [r.result for r in conn.results]
            if slots == "default":
                want = [s.name for s in inp.slots] or available
            elif slots in ("all", "passthrough"):
                want = available
            else:
                want = list(slots)
            missing = [s for s in want if s not in available]
            if missing:
                raise HTTPError(422, f"Input {input_name} has no slot(s) {', '.join(missing)}")
            parts.append(self._output_dataset(src, conn.output, want))
        return parts[0] if len(parts) == 1 else Dataset.append_many(*parts)

    def _output_dataset(self, job: Job, name: str, slots: Any) -> Dataset:
        out = job.spec.outputs.root.get(name)
        if out is None:
            raise HTTPError(404, f"Job {job.project_uid}-{job.uid} has no output {name}")
        own = self.datasets.get((job.project_uid, job.uid, name))
        if own is None:
            raise HTTPError(
                422, f"Job {job.project_uid}-{job.uid} has no results for output {name}"
            )
        names = [r.name for r in out.results]
        passthrough = {r.name for r in out.results if r.passthrough}
        if slots == "default":
            want = [r.name for r in out.results if not r.passthrough]
        elif slots == "passthrough":
            want = sorted(passthrough)
        elif slots == "all":
            want = names
        else:
            want = list(slots)
        unknown = [s for s in want if s not in names]
        if unknown:
            raise HTTPError(422, f"Output {name} of {job.uid} has no slot(s) {', '.join(unknown)}")
        dset = own.filter_prefixes([s for s in want if s not in passthrough], copy=True)
        through = [s for s in want if s in passthrough]
        if through and out.passthrough:
            joined = self._input_dataset(job, out.passthrough, through)
            dset = dset.innerjoin(joined)
        return dset

    def _event(self, job: Job, event: Any) -> Any:
        self.events[(job.project_uid, job.uid)].append(event)
        return event

    # ---------------------------------------------------------------- auth
    def op_login(self, form: dict[str, str], expires_in: float | None = None) -> Token:
        email, password = form.get("username", ""), form.get("password", "")
        known = self.users.get(email)
        if known is None or known[0] != password:
            raise HTTPError(401, "Incorrect email or password")
        token = secrets.token_urlsafe(24)
        self.tokens[token] = email
        return Token(access_token=token, token_type="bearer")

    def user_for(self, token: str | None) -> User:
        email = self.tokens.get(token or "")
        if email is None:
            raise HTTPError(401, "Not authenticated")
        return self.users[email][1]

    # ---------------------------------------------------------------- operations
    def op_health(self) -> str:
        return "OK"

    def op_users_me(self, user: User) -> User:
        return user

    def op_config_get_version(self) -> str:
        return self.version

    def op_projects_find_one(self, project_uid: str) -> Project:
        return self.project(project_uid)

    def op_projects_get_directory(self, project_uid: str) -> str:
        return self.project(project_uid).project_dir

    def op_projects_ls(self, project_uid: str, recursive: bool = False, path: str = "") -> list:
        base = self.project_path(project_uid, path)
        pdir = Path(self.project(project_uid).project_dir)
        it = base.rglob("*") if recursive else base.iterdir()
        return sorted(str(p.relative_to(pdir)) for p in it)

    def op_projects_download_file(self, project_uid: str, path: str = "") -> Path:
        p = self.project_path(project_uid, path)
        if not p.is_file():
            raise HTTPError(404, f"File {path} not found in project {project_uid}")
        return p

    def op_projects_upload_file(
        self, project_uid: str, body: bytes, overwrite: bool = False, path: str = ""
    ) -> str:
        p = self.project_path(project_uid, path)
        if p.exists() and not overwrite:
            raise HTTPError(409, f"File {path} already exists")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)
        return str(p)

    def op_workspaces_find_one(self, project_uid: str, workspace_uid: str) -> Workspace:
        self.project(project_uid)
        ws = self.workspaces.get((project_uid, workspace_uid))
        if ws is None:
            raise HTTPError(404, f"Workspace {project_uid}-{workspace_uid} not found")
        return ws

    def op_jobs_find_one(self, project_uid: str, job_uid: str) -> Job:
        return self.job(project_uid, job_uid)

    def op_jobs_get_directory(self, project_uid: str, job_uid: str) -> str:
        job = self.job(project_uid, job_uid)
        return str(Path(self.projects[project_uid].project_dir) / job.job_dir)

    def op_jobs_create(
        self,
        project_uid: str,
        workspace_uid: str,
        type: str,
        body: Any = None,
        title: str = "",
        description: str = "",
        created_by_job_uid: str | None = None,
        enable_bench: bool = False,
        user: User | None = None,
    ) -> Job:
        if type != "snowflake":
            raise HTTPError(422, f"Job type {type} is not available in this stand-in")
        job = self._new_job(project_uid, workspace_uid, type, title)
        job.description = description
        job.created_by_user_id = user.id if user else None
        return job

    def op_jobs_add_external_input(
        self, project_uid: str, job_uid: str, input_name: str, body: dict
    ) -> Job:
        job = self._external(project_uid, job_uid)
        if job.status != "building":
            raise HTTPError(400, f"Cannot add inputs to {job_uid}: job is {job.status}")
        spec = InputSpec.model_validate(body)
        slots = [
            s
            if isinstance(s, InputSlot)
            else InputSlot(name=s.lstrip("?"), dtype=s.lstrip("?"), required=not s.startswith("?"))
            for s in spec.slots
        ]
        job.spec.inputs.root[input_name] = Input(
            type=spec.type,
            title=spec.title,
            description=spec.description,
            slots=slots,
            count_min=spec.count_min,
            count_max=spec.count_max,
        )
        return job

    def op_jobs_connect(
        self,
        project_uid: str,
        job_uid: str,
        input_name: str,
        source_job_uid: str,
        source_output_name: str,
    ) -> Job:
        job = self.job(project_uid, job_uid)
        if job.status != "building":
            raise HTTPError(400, f"Cannot connect inputs of {job_uid}: job is {job.status}")
        inp = job.spec.inputs.root.get(input_name)
        if inp is None:
            raise HTTPError(404, f"Job {job_uid} has no input {input_name}")
        src = self.job(project_uid, source_job_uid)
        out = src.spec.outputs.root.get(source_output_name)
        if out is None:
            raise HTTPError(404, f"Job {source_job_uid} has no output {source_output_name}")
        if (project_uid, source_job_uid, source_output_name) not in self.datasets:
            raise HTTPError(422, f"Output {source_job_uid}.{source_output_name} has no results")
        if out.type != inp.type:
            raise HTTPError(422, f"Cannot connect {out.type} output to {inp.type} input")
        have = [r.name for r in out.results]
        missing = [s.name for s in inp.slots if s.required and s.name not in have]
        if missing:
            raise HTTPError(
                422,
                f"Output {source_job_uid}.{source_output_name} lacks required "
                f"slot(s) {', '.join(missing)}",
            )
        results = [
            InputResult(
                name=r.name,
                dtype=r.dtype,
                job_uid=source_job_uid,
                output=source_output_name,
                result=r.name,
            )
            for r in out.results
        ]
        inp.connections.append(
            Connection(job_uid=source_job_uid, output=source_output_name, results=results)
        )
        if source_job_uid not in job.parents:
            job.parents.append(source_job_uid)
        return job

    def op_jobs_add_external_output(
        self, project_uid: str, job_uid: str, output_name: str, body: dict
    ) -> Job:
        job = self._external(project_uid, job_uid)
        if job.status in FINISHED:
            raise HTTPError(400, f"Cannot add outputs to {job_uid}: job is {job.status}")
        if output_name in job.spec.outputs.root:
            raise HTTPError(409, f"Job {job_uid} already has an output {output_name}")
        spec = OutputSpec.model_validate(body)
        slots = [
            s if isinstance(s, OutputSlot) else OutputSlot(name=s, dtype=s) for s in spec.slots
        ]
        unknown = [s.dtype for s in slots if s.dtype not in SLOT_FIELDS]
        if unknown:
            raise HTTPError(422, f"Unknown slot type(s) {', '.join(unknown)}")
        results = [OutputResult(name=s.name, dtype=s.dtype) for s in slots]
        if spec.passthrough:
            inp = job.spec.inputs.root.get(spec.passthrough)
            if inp is None:
                raise HTTPError(422, f"Passthrough input {spec.passthrough} does not exist")
            own = {s.name for s in slots}
            for conn in inp.connections[:1]:
                for r in conn.results:
                    if r.result not in own:
                        results.append(OutputResult(name=r.result, dtype=r.dtype, passthrough=True))
        job.spec.outputs.root[output_name] = Output(
            type=spec.type,
            title=spec.title,
            description=spec.description,
            slots=slots,
            passthrough=spec.passthrough,
            results=results,
        )
        return job

    def op_jobs_get_output_fields(
        self, project_uid: str, job_uid: str, output_name: str, body: Any = None
    ) -> list:
        job = self.job(project_uid, job_uid)
        out = job.spec.outputs.root.get(output_name)
        if out is None:
            raise HTTPError(404, f"Job {job_uid} has no output {output_name}")
        return [
            (f"{s.name}/{suffix}", dtype)
            for s in out.slots
            for suffix, dtype in SLOT_FIELDS[s.dtype]
        ]

    def op_jobs_load_input(
        self,
        project_uid: str,
        job_uid: str,
        input_name: str,
        force_join: Any = "auto",
        slots: Any = "default",
    ) -> Dataset:
        return self._input_dataset(self.job(project_uid, job_uid), input_name, slots)

    def op_jobs_load_output(
        self,
        project_uid: str,
        job_uid: str,
        output_name: str,
        version: Any = "F",
        slots: Any = "default",
    ) -> Dataset:
        return self._output_dataset(self.job(project_uid, job_uid), output_name, slots)

    def op_jobs_save_output(
        self,
        project_uid: str,
        job_uid: str,
        output_name: str,
        body: bytes,
        filename: str | None = None,
        version: int = 0,
    ) -> Job:
        job = self._external(project_uid, job_uid)
        if job.status not in ("running", "waiting"):
            raise HTTPError(
                400,
                f"Job {project_uid}-{job_uid} is {job.status}: outputs can "
                "only be saved while it is running or waiting",
            )
        out = job.spec.outputs.root.get(output_name)
        if out is None:
            raise HTTPError(404, f"Job {job_uid} has no output {output_name}")
        try:
            dset = Dataset.load(io.BytesIO(body))
        except Exception as exc:
            raise HTTPError(422, f"Could not read the dataset: {exc}") from exc
        expected = dict(self.op_jobs_get_output_fields(project_uid, job_uid, output_name))
        have = {f[0]: f for f in dset.descr()}
        missing = sorted(set(expected) - set(have))
        if "uid" not in have or missing:
            raise HTTPError(
                422,
                f"Dataset for output {output_name} is missing field(s) "
                f"{', '.join((['uid'] if 'uid' not in have else []) + missing)}",
            )
        for name, dtype in expected.items():
            want, col = np.dtype(dtype), dset[name]
            if want.base != col.dtype or want.shape != col.shape[1:]:
                raise HTTPError(
                    422, f"Field {name} has dtype {col.dtype}{col.shape[1:]}, expected {dtype}"
                )
        if out.passthrough:
            parent = self._input_dataset(job, out.passthrough, [])
            extra = np.setdiff1d(dset["uid"], parent["uid"])
            if len(extra):
                raise HTTPError(
                    422,
                    f"{len(extra)} row(s) of output {output_name} are not in "
                    f"input {out.passthrough} (passthrough needs its uids)",
                )
        dset = dset.filter_fields(["uid", *expected], copy=True)
        self.datasets[(project_uid, job_uid, output_name)] = dset
        rel = f"{job_uid}/{filename or f'{job_uid}_{output_name}'}.cs"
        dset.save(self.project_path(project_uid, rel), format=CSDAT_FORMAT)
        for r in out.results:
            if not r.passthrough:
                r.versions, r.metafiles, r.num_items = [version], [rel], [len(dset)]
        out.num_items = len(dset)
        return job

    def op_jobs_mark_running(self, project_uid: str, job_uid: str, status: str = "running") -> Job:
        job = self._external(project_uid, job_uid)
        if job.status in FINISHED:
            raise HTTPError(400, f"Job {job_uid} is {job.status}; clear it before running again")
        for name, inp in job.spec.inputs.root.items():
            if len(inp.connections) < inp.count_min:
                raise HTTPError(422, f"Input {name} of {job_uid} needs a connection")
        self._set_status(job, status)
        return job

    def op_jobs_mark_completed(self, project_uid: str, job_uid: str) -> Job:
        job = self._external(project_uid, job_uid)
        if job.status not in ("running", "waiting"):
            raise HTTPError(400, f"Job {job_uid} is {job.status}, not running")
        self._set_status(job, "completed")
        return job

    def op_jobs_mark_failed(self, project_uid: str, job_uid: str, error: str | None = None) -> Job:
        job = self.job(project_uid, job_uid)
        if job.status == "completed":
            raise HTTPError(400, f"Job {job_uid} is completed")
        self._set_status(job, "failed")
        if error:
            job.errors_run.append(RunError(message=error))
            self._event(
                job,
                TextEvent(
                    _id=oid(),
                    project_uid=project_uid,
                    job_uid=job_uid,
                    type="error",
                    text=error,
                    created_at=now(),
                ),
            )
        return job

    def op_jobs_add_event_log(
        self, project_uid: str, job_uid: str, body: str, type: str = "text"
    ) -> TextEvent:
        job = self.job(project_uid, job_uid)
        return self._event(
            job,
            TextEvent(
                _id=oid(),
                project_uid=project_uid,
                job_uid=job_uid,
                type=type,
                text=body,
                created_at=now(),
            ),
        )

    def op_jobs_update_event_log(
        self,
        project_uid: str,
        job_uid: str,
        event_id: str,
        body: str | None = None,
        type: str | None = None,
    ) -> TextEvent:
        self.job(project_uid, job_uid)
        for ev in self.events[(project_uid, job_uid)]:
            if ev.id == event_id and isinstance(ev, TextEvent):
                if body is not None:
                    ev.text = body
                if type is not None:
                    ev.type = type  # type: ignore[assignment]
                ev.updated_at = now()
                return ev
        raise HTTPError(404, f"Event {event_id} not found")

    def op_jobs_add_image_log(
        self,
        project_uid: str,
        job_uid: str,
        body: list,
        text: str,
        flags: list[str] | None = None,
    ) -> ImageEvent:
        job = self.job(project_uid, job_uid)
        images = [GridFSAsset.model_validate(b) for b in body]
        unknown = [a.fileid for a in images if a.fileid not in self.assets]
        if unknown:
            raise HTTPError(404, f"Asset(s) {', '.join(unknown)} not found")
        return self._event(
            job,
            ImageEvent(
                _id=oid(),
                project_uid=project_uid,
                job_uid=job_uid,
                type="image",
                text=text,
                imgfiles=images,
                flags=flags or ["plots"],
                created_at=now(),
            ),
        )

    def op_jobs_add_checkpoint(self, project_uid: str, job_uid: str, body: Any) -> Any:
        job = self.job(project_uid, job_uid)
        return self._event(
            job,
            CheckpointEvent(
                _id=oid(),
                project_uid=project_uid,
                job_uid=job_uid,
                type="checkpoint",
                meta=body or {},
            ),
        )

    def op_assets_upload(
        self,
        project_uid: str,
        job_uid: str,
        body: bytes,
        filename: str | None = None,
        format: str | None = None,
    ) -> GridFSAsset:
        self.job(project_uid, job_uid)
        ext = format or (filename or "").rsplit(".", 1)[-1].lower()
        if ext not in ASSET_TYPES:
            raise HTTPError(422, f"Unsupported asset format {ext!r}")
        info = GridFSAsset(fileid=oid(), filename=filename or f"asset.{ext}", filetype=ext)
        self.assets[info.fileid] = Asset(info, body, project_uid, job_uid)
        return info

    def op_assets_find(self, project_uid: str | None = None, job_uid: str | None = None) -> list:
        from cryosparc.models.asset import GridFSFile

        return [
            GridFSFile(
                _id=k,
                filename=a.info.filename,
                contentType=ASSET_TYPES[a.info.filetype],
                length=len(a.data),
                chunkSize=len(a.data),
                project_uid=a.project_uid,
                job_uid=a.job_uid,
            )
            for k, a in self.assets.items()
            if project_uid in (None, a.project_uid) and job_uid in (None, a.job_uid)
        ]
