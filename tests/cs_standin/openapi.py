"""The stand-in's OpenAPI document: one entry per operation cryosparc-tools 5.0 calls.

cryosparc-tools builds its ``cs.api`` methods from this document: an operation's
``summary`` becomes the method name (``"jobs.create"`` → ``cs.api.jobs.create``), path
parameters are positional, query parameters keyword-only, the request body positional or
named after the body schema's ``title``; JSON responses are decoded into the model named by
the response ``$ref`` (``#/components/schemas/Job`` → ``cryosparc.models.job.Job``).
Names and signatures below follow cryosparc-tools 5.0.3's ``api.pyi`` and the calls in its
controllers; the paths are this stand-in's own choice (the client never hard-codes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DATASET_MIME = "application/x-cryosparc-dataset"
STREAM_MIME = "application/octet-stream"


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path" | "query"
    schema: dict[str, Any]
    required: bool = False


@dataclass(frozen=True)
class Operation:
    summary: str
    method: str
    path: str
    params: tuple[Param, ...] = ()
    # body: None, ("json", title, schema), ("dataset",), ("stream",), ("form",)
    body: tuple | None = None
    # response: ("json", schema), ("dataset",), ("stream",)
    response: tuple = ("json", {})
    public: bool = False  # served without a bearer token
    tags: tuple[str, ...] = field(default_factory=tuple)


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR_LIST = {"type": "array", "items": STR}
SLOTS = {"anyOf": [{"enum": ["default", "passthrough", "all"], "type": "string"}, STR_LIST]}
VERSION = {"anyOf": [INT, {"const": "F", "type": "string"}]}
EVENT_TYPE = {"enum": ["text", "warning", "error"], "type": "string"}


def _p(name: str) -> Param:
    return Param(name, "path", STR, True)


def _q(name: str, schema: dict[str, Any] = STR, required: bool = False) -> Param:
    return Param(name, "query", schema, required)


PJ = (_p("project_uid"), _p("job_uid"))

OPERATIONS: tuple[Operation, ...] = (
    Operation("health", "get", "/health", response=("json", STR), public=True),
    Operation(
        "login",
        "post",
        "/login",
        params=(_q("expires_in", {"type": "number"}),),
        body=("form",),
        response=("json", ref("Token")),
        public=True,
    ),
    Operation("users.me", "get", "/users/me", response=("json", ref("User"))),
    Operation("config.get_version", "get", "/config/version", response=("json", STR)),
    Operation(
        "projects.find_one",
        "get",
        "/projects/{project_uid}",
        params=(_p("project_uid"),),
        response=("json", ref("Project")),
    ),
    Operation(
        "projects.get_directory",
        "get",
        "/projects/{project_uid}/directory",
        params=(_p("project_uid"),),
        response=("json", STR),
    ),
    Operation(
        "projects.ls",
        "get",
        "/projects/{project_uid}/ls",
        params=(_p("project_uid"), _q("recursive", BOOL), _q("path")),
        response=("json", STR_LIST),
    ),
    Operation(
        "projects.download_file",
        "get",
        "/projects/{project_uid}/files",
        params=(_p("project_uid"), _q("path")),
        response=("stream",),
    ),
    Operation(
        "projects.upload_file",
        "put",
        "/projects/{project_uid}/files",
        params=(_p("project_uid"), _q("overwrite", BOOL), _q("path")),
        body=("stream",),
        response=("json", STR),
    ),
    Operation(
        "workspaces.find_one",
        "get",
        "/workspaces/{project_uid}/{workspace_uid}",
        params=(_p("project_uid"), _p("workspace_uid")),
        response=("json", {"anyOf": [ref("Workspace"), ref("Session")]}),
    ),
    Operation(
        "jobs.find_one",
        "get",
        "/jobs/{project_uid}/{job_uid}",
        params=PJ,
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.get_directory",
        "get",
        "/jobs/{project_uid}/{job_uid}/directory",
        params=PJ,
        response=("json", STR),
    ),
    Operation(
        "jobs.create",
        "post",
        "/jobs/{project_uid}/{workspace_uid}",
        params=(
            _p("project_uid"),
            _p("workspace_uid"),
            _q("type", STR, True),
            _q("title"),
            _q("description"),
            _q("created_by_job_uid"),
            _q("enable_bench", BOOL),
        ),
        body=("json", "Params", {"type": "object"}),
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.add_external_input",
        "post",
        "/jobs/{project_uid}/{job_uid}/external/inputs/{input_name}",
        params=(*PJ, _p("input_name")),
        body=("json", "Body", ref("InputSpec")),
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.add_external_output",
        "post",
        "/jobs/{project_uid}/{job_uid}/external/outputs/{output_name}",
        params=(*PJ, _p("output_name")),
        body=("json", "Body", ref("OutputSpec")),
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.connect",
        "post",
        "/jobs/{project_uid}/{job_uid}/connect/{input_name}",
        params=(
            *PJ,
            _p("input_name"),
            _q("source_job_uid", STR, True),
            _q("source_output_name", STR, True),
        ),
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.get_output_fields",
        "post",
        "/jobs/{project_uid}/{job_uid}/outputs/{output_name}/fields",
        params=(*PJ, _p("output_name")),
        body=("json", "Dtype Params", {"type": "object"}),
        response=(
            "json",
            {
                "type": "array",
                "items": {"type": "array", "prefixItems": [STR, STR], "minItems": 2, "maxItems": 2},
            },
        ),
    ),
    Operation(
        "jobs.load_input",
        "get",
        "/jobs/{project_uid}/{job_uid}/inputs/{input_name}/dataset",
        params=(
            *PJ,
            _p("input_name"),
            _q("force_join", {"anyOf": [BOOL, STR]}),
            _q("slots", SLOTS),
        ),
        response=("dataset",),
    ),
    Operation(
        "jobs.load_output",
        "get",
        "/jobs/{project_uid}/{job_uid}/outputs/{output_name}/dataset",
        params=(*PJ, _p("output_name"), _q("version", VERSION), _q("slots", SLOTS)),
        response=("dataset",),
    ),
    Operation(
        "jobs.save_output",
        "post",
        "/jobs/{project_uid}/{job_uid}/outputs/{output_name}/dataset",
        params=(*PJ, _p("output_name"), _q("filename"), _q("version", INT)),
        body=("dataset",),
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.mark_running",
        "patch",
        "/jobs/{project_uid}/{job_uid}/status/running",
        params=(*PJ, _q("status", {"enum": ["running", "waiting"], "type": "string"})),
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.mark_completed",
        "patch",
        "/jobs/{project_uid}/{job_uid}/status/completed",
        params=PJ,
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.mark_failed",
        "patch",
        "/jobs/{project_uid}/{job_uid}/status/failed",
        params=(*PJ, _q("error")),
        response=("json", ref("Job")),
    ),
    Operation(
        "jobs.add_event_log",
        "post",
        "/jobs/{project_uid}/{job_uid}/events",
        params=(*PJ, _q("type", EVENT_TYPE)),
        body=("json", "Text", STR),
        response=("json", ref("TextEvent")),
    ),
    Operation(
        "jobs.update_event_log",
        "put",
        "/jobs/{project_uid}/{job_uid}/events/{event_id}",
        params=(*PJ, _p("event_id"), _q("type", EVENT_TYPE)),
        body=("json", "Text", STR),
        response=("json", ref("TextEvent")),
    ),
    Operation(
        "jobs.add_image_log",
        "post",
        "/jobs/{project_uid}/{job_uid}/events/image",
        params=(*PJ, _q("text", STR, True), _q("flags", STR_LIST)),
        body=("json", "Images", {"type": "array", "items": ref("GridFSAsset")}),
        response=("json", ref("ImageEvent")),
    ),
    Operation(
        "jobs.add_checkpoint",
        "post",
        "/jobs/{project_uid}/{job_uid}/events/checkpoint",
        params=PJ,
        body=("json", "Meta", {"type": "object"}),
        response=("json", ref("CheckpointEvent")),
    ),
    Operation(
        "assets.upload",
        "post",
        "/assets/{project_uid}/{job_uid}",
        params=(*PJ, _q("filename"), _q("format")),
        body=("stream",),
        response=("json", ref("GridFSAsset")),
    ),
    Operation(
        "assets.find",
        "get",
        "/assets",
        params=(_q("project_uid"), _q("job_uid")),
        response=("json", {"type": "array", "items": ref("GridFSFile")}),
    ),
)

MODEL_NAMES = (
    "Token",
    "User",
    "Project",
    "Workspace",
    "Session",
    "Job",
    "InputSpec",
    "OutputSpec",
    "TextEvent",
    "ImageEvent",
    "CheckpointEvent",
    "GridFSAsset",
    "GridFSFile",
    "HTTPValidationError",
)


def _param_doc(p: Param) -> dict[str, Any]:
    return {"name": p.name, "in": p.where, "required": p.required, "schema": p.schema}


def _body_doc(body: tuple) -> dict[str, Any]:
    kind = body[0]
    if kind == "json":
        _, title, schema = body
        return {"content": {"application/json": {"schema": {"title": title, **schema}}}}
    if kind == "dataset":
        return {
            "content": {
                DATASET_MIME: {"schema": {"title": "Dataset", "type": "string", "format": "binary"}}
            },
            "required": True,
        }
    if kind == "stream":
        return {
            "content": {
                STREAM_MIME: {"schema": {"title": "Stream", "type": "string", "format": "binary"}}
            },
            "required": True,
        }
    if kind == "form":
        return {
            "content": {"application/x-www-form-urlencoded": {"schema": ref("Body_login")}},
            "required": True,
        }
    raise ValueError(kind)


def _response_doc(resp: tuple) -> dict[str, Any]:
    kind = resp[0]
    if kind == "json":
        return {
            "description": "Successful Response",
            "content": {"application/json": {"schema": resp[1]}},
        }
    mime = DATASET_MIME if kind == "dataset" else STREAM_MIME
    title = "Dataset" if kind == "dataset" else "Stream"
    return {
        "description": f"A binary stream representing a {title} class instance",
        "content": {mime: {"schema": {"title": title, "type": "string", "format": "binary"}}},
    }


def build_openapi(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document served at ``/api/cmd/openapi.json``."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        doc: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.summary.replace(".", "_"),
            "parameters": [_param_doc(p) for p in op.params],
            "responses": {
                "200": _response_doc(op.response),
                "422": {
                    "description": "Validation Error",
                    "content": {"application/json": {"schema": ref("HTTPValidationError")}},
                },
            },
        }
        if op.body is not None:
            doc["requestBody"] = _body_doc(op.body)
        paths.setdefault(op.path, {})[op.method] = doc
    components = {name: {"title": name, "type": "object"} for name in MODEL_NAMES}
    return {
        "openapi": "3.1.0",
        "info": {"title": "CryoSPARC API (companion test stand-in)", "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
