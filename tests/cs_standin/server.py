"""HTTP front of the stand-in: routes ``/api/cmd/...`` requests to :class:`State` operations.

Standard library only (``http.server.ThreadingHTTPServer``) on 127.0.0.1 and a random port.
Decodes what cryosparc-tools sends — path parameters, JSON-encoded query values (lists as
repeated keys), JSON / form / chunked binary bodies (``Dataset.stream()``) — and answers
with JSON models, CSDAT dataset streams or file bytes. Errors use FastAPI's shape,
``{"detail": ...}``, which the client turns into ``cryosparc.errors.APIError``.

Test hooks: :meth:`StandIn.fail` answers the next call(s) of an operation with an error,
:meth:`StandIn.on` runs a function after the N-th call of an operation was answered (e.g. to
stop the server mid-run), :meth:`StandIn.delay` holds an operation's answer back.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .openapi import DATASET_MIME, OPERATIONS, STREAM_MIME, Operation, build_openapi
from .state import HTTPError, State

API = "/api/cmd"
CHUNK = 1 << 20


def _route_table() -> list[tuple[str, re.Pattern[str], Operation]]:
    table = []
    for op in OPERATIONS:
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", op.path)
        table.append((op.method.upper(), re.compile(f"^{API}{pattern}$"), op))
    # literal paths before templated ones (e.g. /events/image before /events/{event_id})
    table.sort(key=lambda t: t[2].path.count("{"))
    return table


ROUTES = _route_table()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # client gave up: expected
            super().handle_error(request, client_address)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _query_value(schema: dict[str, Any], values: list[str]) -> Any:
    kind = schema.get("type")
    if kind == "array":
        return values
    if "anyOf" in schema:
        kinds = [s.get("type") for s in schema["anyOf"]]
        if "array" in kinds:  # slots: literal or list of slot names
            if len(values) == 1 and values[0] in ("default", "passthrough", "all"):
                return values[0]
            return values
        v = values[-1]
        if "integer" in kinds and v.lstrip("-").isdigit():
            return int(v)
        if "boolean" in kinds and v in ("true", "false"):
            return v == "true"
        return v
    v = values[-1]
    if kind == "boolean":
        return v.lower() == "true"
    if kind == "integer":
        return int(v)
    if kind == "number":
        return float(v)
    return v


class StandIn:
    """A stand-in CryoSPARC v5 API server for tests (see the module docstring)."""

    def __init__(self, root: Path, *, version: str = "v5.0.3") -> None:
        self.state = State(root=Path(root), version=version)
        self._faults: dict[str, list[tuple[int, Any, int]]] = {}  # (status, detail, due call)
        self._hooks: dict[str, list[tuple[int, Callable[[], None]]]] = {}
        self._delays: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"standin": self})
        server = _Server(("127.0.0.1", self.port), handler)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, daemon=True, kwargs={"poll_interval": 0.05}
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def bounce(self, down_for: float) -> None:
        """Stop now (from inside a request too) and start again on the same port later."""

        def run() -> None:
            self.stop()
            time.sleep(down_for)
            self.start()

        threading.Thread(target=run, daemon=True).start()

    def stop_soon(self) -> None:
        """Stop from inside a request (the answer in flight is still delivered)."""
        threading.Thread(target=self.stop, daemon=True).start()

    # ------------------------------------------------------------ test hooks
    def fail(
        self,
        summary: str,
        status: int = 500,
        detail: Any = "Internal Server Error",
        times: int = 1,
        after: int = 0,
    ) -> None:
        """Answer the next ``times`` calls of ``summary`` with ``status``, once ``after`` calls
        (counted from now) have been answered normally: decided when the call arrives, so no
        race with a client that sends its next call as soon as it has an answer."""
        due = self._counts.get(summary, 0) + after + 1
        self._faults.setdefault(summary, []).extend([(status, detail, due)] * times)

    def on(self, summary: str, fn: Callable[[], None], after: int = 1) -> None:
        """Run ``fn`` once the ``after``-th call (counted from now) of ``summary`` is answered."""
        self._hooks.setdefault(summary, []).append((self._counts.get(summary, 0) + after, fn))

    def delay(self, summary: str, seconds: float) -> None:
        self._delays[summary] = seconds

    def count(self, summary: str) -> int:
        return self._counts.get(summary, 0)

    # ------------------------------------------------------------ dispatch
    def _before(self, summary: str) -> None:
        self._counts[summary] = self._counts.get(summary, 0) + 1
        self.state.calls.append(summary)
        if self._delays.get(summary):
            time.sleep(self._delays[summary])
        faults = self._faults.get(summary)
        if faults and faults[0][2] <= self._counts[summary]:
            status, detail, _ = faults.pop(0)
            raise HTTPError(status, detail)

    def _after(self, summary: str) -> None:
        hooks = self._hooks.get(summary, [])
        due = [h for h in hooks if h[0] <= self._counts.get(summary, 0)]
        for h in due:
            hooks.remove(h)
            h[1]()


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn
    server_version = "CryoSPARC-standin/5"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------ plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(_jsonable(value)).encode(), "application/json")

    def _send_file(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("Content-Type", STREAM_MIME)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                self.wfile.write(chunk)

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        standin = self.standin
        state = standin.state
        if method == "GET" and url.path == f"{API}/openapi.json":
            if standin._delays.get("openapi"):
                time.sleep(standin._delays["openapi"])
            return self._send_json(200, build_openapi(state.version))
        match = next(
            ((m, op) for meth, rx, op in ROUTES if meth == method and (m := rx.match(url.path))),
            None,
        )
        if match is None:
            return self._send_json(404, {"detail": "Not Found"})
        m, op = match
        try:
            with state.lock:
                standin._before(op.summary)
                user = None
                if not op.public:
                    auth = self.headers.get("Authorization", "")
                    token = auth[7:] if auth.lower().startswith("bearer ") else None
                    user = state.user_for(token)
                kwargs = self._arguments(op, m, url.query, body)
                fn = getattr(state, "op_" + op.summary.replace(".", "_"))
                if "user" in inspect.signature(fn).parameters:
                    kwargs["user"] = user
                result = fn(**kwargs)
                payload = self._encode(op, result)
        except HTTPError as exc:
            self._send_json(exc.status, {"detail": exc.detail})
        else:
            if isinstance(payload, Path):
                self._send_file(payload)
            else:
                self._send(200, *payload)
        standin._after(op.summary)

    def _arguments(self, op: Operation, m: re.Match[str], query: str, body: bytes) -> dict:
        kwargs: dict[str, Any] = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
        qs = urllib.parse.parse_qs(query, keep_blank_values=True)
        missing = []
        for p in op.params:
            if p.where != "query":
                continue
            if p.name in qs:
                kwargs[p.name] = _query_value(p.schema, qs[p.name])
            elif p.required:
                missing.append(
                    {"loc": ["query", p.name], "msg": "Field required", "type": "missing"}
                )
        if missing:
            raise HTTPError(422, missing)
        if op.body is None:
            return kwargs
        kind = op.body[0]
        if kind == "form":
            form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True)
            kwargs["form"] = {k: v[-1] for k, v in form.items()}
        elif kind == "json":
            if body:
                try:
                    kwargs["body"] = json.loads(body)
                except json.JSONDecodeError as exc:
                    raise HTTPError(422, f"Invalid JSON body: {exc}") from exc
        else:
            kwargs["body"] = body
        return kwargs

    def _encode(self, op: Operation, result: Any) -> Any:
        kind = op.response[0]
        if kind == "dataset":
            return b"".join(result.stream()), DATASET_MIME
        if kind == "stream":
            return result  # a Path, sent in chunks
        return json.dumps(_jsonable(result)).encode(), "application/json"
