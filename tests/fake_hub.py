"""A small fake of the Hugging Face Hub's HTTP API, on 127.0.0.1, for testing uploads with the real client.

It implements what ``huggingface_hub`` (2.4) calls for ``create_repo`` + ``create_commit``:

- ``POST /api/repos/create``                          → 200 ``{"url"}``, 409 when the repo exists
- ``POST /api/validate-yaml``                         → README.md metadata check (YAML must parse to a mapping)
- ``POST /api/models/{ns}/{name}/branch/{branch}``    → create a branch from main, 409 when it exists
- ``POST /api/models/{ns}/{name}/preupload/{rev}``    → upload mode per file; always ``regular`` here, so that
  file contents travel base64-encoded inside the commit (the real Hub answers ``lfs`` for ``*.safetensors``
  and the client would then use Xet/LFS storage, which this fake does not implement)
- ``POST /api/models/{ns}/{name}/commit/{rev}``       → NDJSON commit, applied atomically

Every request is recorded (method, path, query, Authorization header). Requests without the expected bearer
token get 401. ``fail(pattern, *actions)`` makes the next requests whose path matches ``pattern`` answer
``"500"`` or ``"reset"`` (the TCP connection is closed with RST, no response) instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


@dataclass
class Request:
    method: str
    path: str
    query: dict
    authorization: str | None
    body: bytes


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


class FakeHub:
    """The server's state and its failure plan; ``url`` is what HF_ENDPOINT should be set to."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._failures: list[tuple[re.Pattern, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, pattern: str, *actions: str) -> None:
        """The next ``len(actions)`` requests whose path matches ``pattern`` get these failures, in order."""
        with self._lock:
            self._failures += [(re.compile(pattern), a) for a in actions]

    def _take_failure(self, path: str) -> str | None:
        with self._lock:
            for i, (pattern, action) in enumerate(self._failures):
                if pattern.search(path):
                    del self._failures[i]
                    return action
        return None

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def _dispatch(self):
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            hub.requests.append(
                Request(self.command, path, parse_qs(parts.query), self.headers.get("Authorization"), body)
            )
            failure = hub._take_failure(path)
            if failure == "reset":
                # SO_LINGER 0: close() sends RST, the client sees a reset connection and no response
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if failure == "500":
                return self._json(
                    500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"}
                )
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._json(401, {"error": "Invalid credentials in Authorization header"})
            for pattern, method in _ROUTES:
                m = re.fullmatch(pattern, path)
                if m and method[0] == self.command:
                    return getattr(self, method[1])(body, **m.groupdict())
            return self._json(404, {"error": f"fake hub: no route for {self.command} {path}"})

        def _json(self, status: int, payload: dict, headers: dict | None = None):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _repo(self, repo: str) -> Repo | None:
            found = hub.repos.get(repo)
            if found is None:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return found

        def _revision(self, repo: str, rev: str) -> Repo | None:
            """The repo when it has branch ``rev``; else None, with the Hub's 404 already sent."""
            found = self._repo(repo)
            if found is not None and rev not in found.branches:
                self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                return None
            return found

        def create_repo(self, body):
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def validate_yaml(self, body):
            import yaml

            content = json.loads(body)["content"]
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(m.group(1)) if m else None
            except yaml.YAMLError as exc:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
            if m and not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
            return self._json(200, {"errors": [], "warnings": []})

        def create_branch(self, body, repo, branch):
            found = self._repo(repo)
            if found is None:
                return None
            if branch in found.branches:
                return self._json(409, {"error": "Reference already exists"})
            found.branches[branch] = dict(found.branches["main"])
            return self._json(200, {})

        def preupload(self, body, repo, rev):
            if self._revision(repo, rev) is None:
                return None
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._json(200, {"files": modes, "commitOid": "0" * 40})

        def commit(self, body, repo, rev):
            found = self._revision(repo, rev)
            if found is None:
                return None
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            staged = dict(found.branches[rev])
            for item in lines:
                if item["key"] == "file":
                    if item["value"].get("encoding") != "base64":
                        return self._json(400, {"error": "fake hub: only base64 files"})
                    staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._json(400, {"error": f"fake hub: unsupported commit item {item['key']}"})
            oid = hashlib.sha1(body).hexdigest()
            found.branches[rev] = staged  # atomic: all files or none
            found.commits.append({"oid": oid, "branch": rev, **header})
            return self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

    return Handler


_ROUTES = [
    (r"/api/repos/create", ("POST", "create_repo")),
    (r"/api/validate-yaml", ("POST", "validate_yaml")),
    (_REPO + r"/branch/(?P<branch>.+)", ("POST", "create_branch")),
    (_REPO + r"/preupload/(?P<rev>.+)", ("POST", "preupload")),
    (_REPO + r"/commit/(?P<rev>.+)", ("POST", "commit")),
]
