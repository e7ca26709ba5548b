"""A stand-in for the Hugging Face Hub's upload API on 127.0.0.1, for tests that run a real `huggingface_hub` upload.

It answers just the requests that `HfApi.create_repo` + `HfApi.create_commit` make (huggingface_hub 2.x):

| request                                                | what the fake does                                  |
|--------------------------------------------------------|-----------------------------------------------------|
| `POST /api/repos/create`                               | creates the repo (409 when it exists)               |
| `POST /api/validate-yaml`                              | accepts the README metadata                         |
| `POST /api/models/{repo}/preupload/{revision}`         | `lfs` for `lfs_suffixes` (weights), else `regular`  |
| `POST /{repo}.git/info/lfs/objects/batch`              | a basic-transfer upload action to `PUT /lfs/{oid}`  |
| `PUT /lfs/{oid}`                                       | stores the object after checking its sha256         |
| `POST /api/models/{repo}/commit/{revision}` (NDJSON)   | records the commit: summary, description, files     |

Anything else gets a 404 and is listed in `unexpected`. API requests must carry `Authorization: Bearer <token>`
when a `token` is given (401 otherwise), so a test also sees that the token is the one used.

Bounded: after `max_requests` requests every answer is a 400 and the server shuts itself down, and it shuts down
after `timeout_s` seconds whatever happens; each request is recorded (method, path, headers, body) in `requests`.

Usage, in a subprocess (huggingface_hub reads `HF_ENDPOINT` when it is imported):

    with FakeHub(token=TOKEN) as fake:
        subprocess.run([...], env=subprocess_env(fake, TOKEN, tmp_path), timeout=120)
    commit = fake.commits[0]

or in the test's own process, with `use_in_process(fake, monkeypatch)`, which points huggingface_hub's constants at
the server (HfApi() created afterwards uses it) and lets sockets connect to 127.0.0.1 only.

The Xet upload protocol is turned off (`HF_HUB_DISABLE_XET`): it talks to a separate content-addressed store that
this fake does not imitate; LFS files then take the classic LFS batch + PUT path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class RecordedRequest:
    """One request as the fake received it; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    """One commit received by the fake Hub; `files` maps each path to its content (LFS files resolved)."""

    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_paths: list[str] = field(default_factory=list)
    body: bytes = b""


_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<revision>[^/]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<revision>[^/]+)$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/lfs/(?P<oid>[0-9a-f]{64})$")


class FakeHub:
    """The fake Hub server; see the module docstring."""

    def __init__(
        self,
        *,
        token: str | None = None,
        max_requests: int = 64,
        timeout_s: float = 120.0,
        lfs_suffixes: tuple[str, ...] = (".safetensors", ".bin", ".pt"),
    ):
        self.token = token
        self.max_requests = max_requests
        self.timeout_s = timeout_s
        self.lfs_suffixes = lfs_suffixes
        self.requests: list[RecordedRequest] = []
        self.unexpected: list[str] = []
        self.repos: dict[str, dict] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.commits: list[Commit] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._closed = threading.Event()

    # -- life cycle ------------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the FakeHub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("FakeHubHandler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.timeout_s, self.close)
        self._timer.daemon = True
        self._timer.start()
        return self

    def close(self) -> None:
        """Stops the server (idempotent; safe from any thread but the serving one)."""
        with self._lock:
            if self._closed.is_set() or self._server is None:
                return
            self._closed.set()
        if self._timer is not None and threading.current_thread() is not self._timer:
            self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- what the tests read ---------------------------------------------------------------------------------------

    def calls(self) -> list[str]:
        """`"METHOD /path"` of every request, with repository ids and object ids kept."""
        return [f"{request.method} {request.path}" for request in self.requests]


def _json_response(handler: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def _error(handler: BaseHTTPRequestHandler, status: int, message: str, code: str | None = None) -> None:
    # huggingface_hub reads X-Error-Code / X-Error-Message to choose its exception and its text
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    _json_response(handler, status, {"error": message}, headers)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub  # set on the subclass that FakeHub.start creates

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # keep the test output quiet; every request is recorded instead

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def do_PUT(self) -> None:  # noqa: N802
        self._handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # an upload from a file object
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        fake = self.fake
        body = self._read_body()
        path = unquote(urlsplit(self.path).path)
        with fake._lock:
            headers = {name.lower(): value for name, value in self.headers.items()}
            fake.requests.append(RecordedRequest(self.command, path, headers, body))
            over_limit = len(fake.requests) > fake.max_requests
        if over_limit:
            # 400, not 5xx: huggingface_hub retries 5xx answers, which would only make a runaway client slower
            _error(self, 400, f"fake hub: more than {fake.max_requests} requests; shutting down")
            threading.Thread(target=fake.close, daemon=True).start()
            return
        if not _LFS_PUT.match(path) and fake.token is not None:
            if self.headers.get("Authorization") != f"Bearer {fake.token}":
                _error(self, 401, "fake hub: missing or wrong token")
                return
        try:
            self._route(path, body)
        except Exception as error:  # a malformed request: answer, so that the client does not hang
            _error(self, 400, f"fake hub: bad request ({type(error).__name__}: {error})")

    def _route(self, path: str, body: bytes) -> None:
        fake = self.fake
        method = self.command
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = (
                f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            )
            url = f"{fake.endpoint}/{repo_id}"
            if repo_id in fake.repos:  # the Hub's 409 also carries the url, which huggingface_hub reads
                message = "You already created this model repo"
                _json_response(self, 409, {"error": message, "url": url}, {"X-Error-Message": message})
                return
            fake.repos[repo_id] = payload
            _json_response(self, 200, {"url": url, "name": repo_id})
        elif method == "POST" and path == "/api/validate-yaml":
            _json_response(self, 200, {"errors": [], "warnings": []})
        elif method == "POST" and (match := _PREUPLOAD.match(path)):
            if match["repo"] not in fake.repos:
                _error(self, 404, "Repository not found", "RepoNotFound")
                return
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if item["path"].endswith(fake.lfs_suffixes) else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for item in files
            ]
            _json_response(self, 200, {"files": modes, "commitOid": "0" * 40})
        elif method == "POST" and (match := _LFS_BATCH.match(path)):
            payload = json.loads(body)
            objects = [
                {
                    "oid": item["oid"],
                    "size": item["size"],
                    "authenticated": True,
                    "actions": {"upload": {"href": f"{fake.endpoint}/lfs/{item['oid']}"}},
                }
                for item in payload["objects"]
            ]
            _json_response(self, 200, {"transfer": "basic", "objects": objects})
        elif method == "PUT" and (match := _LFS_PUT.match(path)):
            if hashlib.sha256(body).hexdigest() != match["oid"]:
                _error(self, 400, "fake hub: content does not match its sha256")
                return
            fake.lfs_objects[match["oid"]] = body
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif method == "POST" and (match := _COMMIT.match(path)):
            if match["repo"] not in fake.repos:
                _error(self, 404, "Repository not found", "RepoNotFound")
                return
            commit = Commit(repo_id=match["repo"], revision=match["revision"], summary="", description="", body=body)
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    commit.summary, commit.description = value["summary"], value.get("description", "")
                elif item["key"] == "file":
                    commit.files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in fake.lfs_objects:
                        _error(self, 422, f"fake hub: LFS object of {value['path']} was never uploaded")
                        return
                    commit.files[value["path"]] = fake.lfs_objects[value["oid"]]
                    commit.lfs_paths.append(value["path"])
                else:
                    _error(self, 400, f"fake hub: unsupported commit operation {item['key']!r}")
                    return
            oid = hashlib.sha1(body).hexdigest()
            fake.commits.append(commit)
            _json_response(
                self,
                200,
                {"success": True, "commitOid": oid, "commitUrl": f"{fake.endpoint}/{commit.repo_id}/commit/{oid}"},
            )
        else:
            fake.unexpected.append(f"{method} {path}")
            _error(self, 404, f"fake hub: no route for {method} {path}")


# ---------------------------------------------------------------------------------------------------------------------
# pointing huggingface_hub at the fake

# sitecustomize for the subprocess: sockets may only connect to 127.0.0.1, whatever the code under test does
_LOCAL_ONLY_SITECUSTOMIZE = """
import socket

_connect = socket.socket.connect


def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
        raise OSError(f"test guard: connection to {address!r} refused (only 127.0.0.1 is allowed)")
    return _connect(self, address)


socket.socket.connect = _local_only
"""


def subprocess_env(fake: FakeHub, token: str, tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess that talks to `fake` only: `HF_ENDPOINT`, the fake `HF_TOKEN`, an empty
    `HF_HOME` (no cached login), no proxies, no Xet, no progress bars, no telemetry, and a `sitecustomize` that
    refuses every connection except to 127.0.0.1."""
    guard_dir = tmp_path / "local-only-site"
    guard_dir.mkdir(exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(_LOCAL_ONLY_SITECUSTOMIZE)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and not key.startswith(("HF_", "HUGGINGFACE_"))
    }
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir(exist_ok=True)
    env.update(
        HF_ENDPOINT=fake.endpoint,
        HF_TOKEN=token,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join(filter(None, [str(guard_dir), env.get("PYTHONPATH")])),
    )
    return env


def use_in_process(fake: FakeHub, monkeypatch, token: str | None = None) -> None:
    """Points this process's huggingface_hub at `fake` (its module-level functions and the HfApi objects created
    afterwards use it), turns Xet and telemetry off, sets `HF_TOKEN` when `token` is given, and lets sockets connect
    to 127.0.0.1 only (for the test's duration)."""
    import huggingface_hub.constants
    import huggingface_hub.hf_api

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.endpoint)
    # the module-level functions (`create_repo`, `upload_folder`, ... as transformers' `push_to_hub` calls them) are
    # methods of one `HfApi` made when `hf_api` was first imported, with the endpoint of that moment
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", fake.endpoint)
    # ... and so is transformers' own shared `HfApi` (`transformers.utils.hub.hf_api()`), once a test has used it:
    # dropped here, it is made again with the fake endpoint, and the one before comes back after the test
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:
        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    # with telemetry on, building the request headers fetches `{ENDPOINT}/api/agent-harnesses` once a day
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    connect = socket.socket.connect

    def local_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test guard: connection to {address!r} refused (only 127.0.0.1 is allowed)")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def assert_token_only_in_authorization(fake: FakeHub, token: str) -> None:
    """The token was sent (as `Authorization: Bearer`) and appears nowhere else: no request body, no other header,
    no committed file, no commit summary or description."""
    assert any(request.headers.get("authorization") == f"Bearer {token}" for request in fake.requests)
    for request in fake.requests:
        assert token.encode() not in request.body, f"token in the body of {request.method} {request.path}"
        for name, value in request.headers.items():
            assert name == "authorization" or token not in value, f"token in header {name}"
    for commit in fake.commits:
        assert token not in commit.summary and token not in commit.description
        for path, content in commit.files.items():
            assert token.encode() not in content, f"token in the committed file {path}"
    for oid, content in fake.lfs_objects.items():
        assert token.encode() not in content, f"token in the LFS object {oid}"
