"""A small fake of the Hugging Face Hub's HTTP API, on 127.0.0.1, for testing uploads with the real client.

It implements what ``huggingface_hub`` (2.4) and ``hf_xet`` (1.8) send for ``create_repo`` + ``create_commit``, on
both upload paths for weights (read from ``_commit_api.py``, ``lfs.py`` and ``utils/_http.py``, and the Xet protocol
specification; the client takes Xet whenever ``hf_xet`` is importable and ``HF_HUB_DISABLE_XET`` is not set):

- ``POST /api/repos/create``                          → 200 ``{"url"}``, 409 when the repo exists
- ``POST /api/validate-yaml``                         → README.md metadata check (YAML must parse to a mapping)
- ``POST /api/models/{ns}/{name}/branch/{branch}``    → create a branch from main, 409 when it exists
- ``POST /api/models/{ns}/{name}/preupload/{rev}``    → upload mode per file, decided as the Hub does: ``lfs``
  for the LFS patterns of the Hub's default ``.gitattributes``, for files of 10 MiB or more and for binary samples
  (a NUL byte in the first 512 bytes); ``regular`` otherwise (contents then travel base64 inside the commit)
- ``POST /api/models/{ns}/{name}/commit/{rev}``       → NDJSON commit, applied atomically; an ``lfsFile`` whose
  object was never stored (or whose size differs) is refused with 422 as the Hub does

LFS path (``HF_HUB_DISABLE_XET=1``):

- ``POST /{ns}/{name}.git/info/lfs/objects/batch``    → git-lfs batch API: per object a ``basic`` transfer (one PUT
  to a signed URL on this server, then ``verify``), or above ``part_size`` the Hub's ``multipart`` transfer
  (``chunk_size`` and one signed URL per part in the upload header, ``href`` = the completion URL); an object
  already stored gets no actions (the client skips it)
- ``PUT /lfs-storage/{oid}?sig`` and ``PUT /lfs-storage/{oid}/{upload_id}/{part}?sig`` → the storage side (S3 on
  the Hub): no Authorization header, the URL's signature is the credential; a part answers with its ``ETag``
- ``POST /api/complete_multipart/{upload_id}?sig``    → joins the parts named by ``{oid, parts: [{partNumber, etag}]}``
- ``POST /{ns}/{name}.git/info/lfs/objects/verify``   → 200 when the object is stored with that size, else 404

Xet path (the default of the pinned versions):

- ``GET /api/models/{ns}/{name}/xet-write-token/{rev}`` → ``{accessToken, exp, casUrl}``, the CAS being ``/cas`` on
  this server; the CAS routes accept only that token, never the Hub token
- ``GET /cas/v1/chunks/{prefix}/{hash}``               → 404 (no global deduplication)
- ``POST /cas/v1/xorbs/default/{hash}``                → a xorb: its chunks are decompressed (none, LZ4,
  byte-grouping-4 + LZ4) and kept
- ``POST /cas/v1/shards``                              → the files: each one is rebuilt from the chunk ranges of
  the stored xorbs and must have the sha256 of its metadata extension (400 otherwise); it is then stored under
  that sha256, which the commit's ``lfsFile`` names
- not implemented, answered 404 as by a server without them, after which the client uses the routes above:
  ``/cas/v1/xorb-grants/...`` (a direct-to-storage grant), ``/cas/v2/shards`` (the streaming variant)

Stored bytes are checked on arrival: a single PUT, a joined multipart object or a file rebuilt from xorbs must have
the sha256 and size announced for it (400 otherwise), so a test reading :meth:`FakeHub.files` compares exactly what
reached the server.

Every request is recorded (method, path, query, Authorization header, body). Requests without the expected bearer
token get 401. ``fail(pattern, *actions)`` makes the next requests whose path matches ``pattern`` answer with a
failure instead: ``"500"`` (the Hub's error body), ``"503"`` (with ``Retry-After: 0``, so the client's retries do
not sleep long), ``"403"`` (not retried by any client), or ``"reset"`` (half the request body is read, then the
TCP connection is closed with RST and no response: a reset in the middle of an upload).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
_GIT = r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects"
# the LFS patterns of the .gitattributes the Hub puts in every new model repo (the binary formats among them)
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
    "*tfevents*", "*.gguf", "*.png",
)  # fmt: skip
LFS_SIZE = 10 * 2**20  # the Hub stores anything this large in LFS, whatever its name
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"


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
    branches: dict[str, dict[str, bytes | LfsPointer]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class LfsPointer:
    """A file of a commit stored in LFS: what the commit's ``lfsFile`` named."""

    oid: str
    size: int


@dataclass
class _Multipart:
    oid: str
    size: int
    parts: dict[int, bytes] = field(default_factory=dict)


class FakeHub:
    """The server's state and its failure plan; ``url`` is what HF_ENDPOINT should be set to.

    Args:
        token: the only bearer token the API accepts.
        part_size: objects larger than this get the multipart transfer, in parts of this size (the Hub's parts
            are tens of MiB; tests use small ones so that a small model has several).
    """

    def __init__(self, token: str, *, part_size: int = 64 * 2**20):
        self.token = token
        self.part_size = part_size
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex → bytes: as LFS received them, or rebuilt from Xet
        self._announced: dict[str, int] = {}  # oid → size, from the batch requests
        self._multipart: dict[str, _Multipart] = {}
        self._secret = uuid.uuid4().bytes
        self.xet_token = f"xet_{uuid.uuid4().hex}"  # what the Xet token endpoint hands out for the CAS routes
        self.xorbs: dict[str, list[bytes]] = {}  # xorb hash (as in its URL) → its chunks, decompressed
        self._failures: list[tuple[re.Pattern, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # serve_forever checks for shutdown every poll_interval (0.5 s by default): every test's teardown waited for it
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, pattern: str, *actions: str) -> None:
        """The next ``len(actions)`` requests whose path matches ``pattern`` get these failures, in order."""
        unknown = [a for a in actions if a not in ("403", "500", "503", "reset")]
        if unknown:
            raise ValueError(f"unknown failure actions {unknown}")
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
        """Every file of ``branch`` as the server holds it (weights read back from their storage)."""
        stored = self.repos[repo_id].branches[branch]
        return {k: self.lfs_objects[v.oid] if isinstance(v, LfsPointer) else v for k, v in stored.items()}

    def lfs_files(self, repo_id: str, branch: str = "main") -> set[str]:
        """The files of ``branch`` that were committed as ``lfsFile`` (stored outside git, by LFS or Xet)."""
        return {k for k, v in self.repos[repo_id].branches[branch].items() if isinstance(v, LfsPointer)}

    def upload_mode(self, path: str, size: int, sample: bytes) -> str:
        name = path.rsplit("/", 1)[-1]
        binary = b"\x00" in sample
        lfs = size >= LFS_SIZE or binary or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)
        return "lfs" if lfs else "regular"

    def sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def do_PUT(self):
            self._dispatch()

        def _dispatch(self):
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            failure = hub._take_failure(path)
            if failure == "reset":
                self._read_body(limit=max(1, int(self.headers.get("Content-Length") or 2) // 2))
                hub.requests.append(Request(self.command, path, parse_qs(parts.query), self._auth(), b""))
                # SO_LINGER 0: close() sends RST, the client sees a reset connection and no response
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            body = self._read_body()
            self.query = parse_qs(parts.query)
            hub.requests.append(Request(self.command, path, self.query, self._auth(), body))
            if failure == "500":
                return self._json(
                    500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"}
                )
            if failure == "403":
                return self._json(403, {"error": "Forbidden"})
            if failure == "503":
                return self._json(503, {"error": "Service Unavailable"}, {"Retry-After": "0"})
            for pattern, (method, name, authenticated) in _ROUTES:
                m = re.fullmatch(pattern, path)
                if m and method == self.command:
                    token = hub.xet_token if authenticated == "xet" else hub.token
                    if authenticated and self._auth() != f"Bearer {token}":
                        return self._json(401, {"error": "Invalid credentials in Authorization header"})
                    return getattr(self, name)(body, **m.groupdict())
            return self._json(404, {"error": f"fake hub: no route for {self.command} {path}"})

        def _auth(self) -> str | None:
            return self.headers.get("Authorization")

        def _read_body(self, limit: int | None = None) -> bytes:
            """The request body, Content-Length or chunked; at most ``limit`` bytes."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while limit is None or len(out) < limit:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    out += self.rfile.read(size)
                    self.rfile.readline()
                return bytes(out)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(min(length, limit) if limit is not None else length) if length else b""

        def _json(self, status: int, payload: dict, headers: dict | None = None, content_type="application/json"):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
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

        def _signed(self, what: str) -> bool:
            """True when the URL carries this server's signature of ``what``; else a 403 (S3's answer) is sent."""
            if hmac.compare_digest(self.query.get("X-Amz-Signature", [""])[0], hub.sign(what)):
                return True
            self._json(403, {"error": "SignatureDoesNotMatch"})
            return False

        def _store(self, oid: str, size: int, data: bytes) -> bool:
            """Keep ``data`` as object ``oid`` when its sha256 and size are the announced ones; else a 400."""
            if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
                self._json(
                    400, {"error": f"BadDigest: got {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"}
                )
                return False
            with hub._lock:
                hub.lfs_objects[oid] = data
            return True

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
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": hub.upload_mode(f["path"], f["size"], base64.b64decode(f["sample"])),
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return self._json(200, {"files": modes, "commitOid": "0" * 40})

        def xet_write_token(self, body, repo, rev):
            if self._revision(repo, rev) is None:
                return None
            cas, expires = f"{hub.url}/cas", int(time.time()) + 3600
            headers = {
                "X-Xet-Cas-Url": cas,
                "X-Xet-Access-Token": hub.xet_token,
                "X-Xet-Token-Expiration": str(expires),
            }
            return self._json(200, {"accessToken": hub.xet_token, "exp": expires, "casUrl": cas}, headers)

        def xet_chunk(self, body, hash):
            return self._json(404, {"error": "chunk not tracked by global deduplication"})

        def xet_xorb(self, body, hash):
            try:
                chunks = xorb_chunks(body)
            except ValueError as exc:
                return self._json(400, {"error": f"bad xorb: {exc}"})
            with hub._lock:
                inserted = hash not in hub.xorbs
                hub.xorbs[hash] = chunks
            return self._json(200, {"was_inserted": inserted})

        def xet_shard(self, body):
            try:
                files = shard_files(body)
                rebuilt = [
                    (sha256, b"".join(c for x, a, b in terms for c in hub.xorbs[x][a:b])) for sha256, terms in files
                ]
            except (ValueError, KeyError) as exc:
                return self._json(400, {"error": f"bad shard or unknown xorb: {exc}"})
            for sha256, data in rebuilt:
                if hashlib.sha256(data).hexdigest() != sha256:
                    return self._json(
                        400, {"error": f"file reconstructs to sha256 {hashlib.sha256(data).hexdigest()}, not {sha256}"}
                    )
            with hub._lock:
                hub.lfs_objects.update(rebuilt)
            return self._json(200, {"result": 1})

        def lfs_batch(self, body, repo):
            if self._repo(repo) is None:
                return None
            request = json.loads(body)
            if request.get("operation") != "upload" or request.get("hash_algo", "sha256") != "sha256":
                return self._json(422, {"message": "fake hub: only sha256 uploads"}, content_type=LFS_CONTENT_TYPE)
            transfers = request.get("transfers") or ["basic"]
            objects, transfer = [], "basic"
            for obj in request["objects"]:
                oid, size = obj["oid"], obj["size"]
                if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                    objects.append({"oid": str(oid), "size": 0, "error": {"code": 422, "message": "bad oid or size"}})
                elif oid in hub.lfs_objects:
                    objects.append({"oid": oid, "size": size})  # no actions: already stored
                elif size > hub.part_size and "multipart" in transfers:
                    transfer = "multipart"
                    objects.append(
                        {"oid": oid, "size": size, "actions": {"upload": self._multipart_action(oid, size)}}
                    )
                else:
                    hub._announced[oid] = size
                    put = f"/lfs-storage/{oid}"
                    upload = {"href": f"{hub.url}{put}?{urlencode({'X-Amz-Signature': hub.sign(put)})}"}
                    verify = {"href": f"{hub.url}/{repo}.git/info/lfs/objects/verify", "header": {}}
                    objects.append({"oid": oid, "size": size, "actions": {"upload": upload, "verify": verify}})
            return self._json(200, {"transfer": transfer, "objects": objects}, content_type=LFS_CONTENT_TYPE)

        def _multipart_action(self, oid: str, size: int) -> dict:
            upload_id = uuid.uuid4().hex
            hub._multipart[upload_id] = _Multipart(oid, size)
            header = {"chunk_size": str(hub.part_size)}
            for n in range(1, -(-size // hub.part_size) + 1):
                put = f"/lfs-storage/{oid}/{upload_id}/{n}"
                header[str(n)] = f"{hub.url}{put}?{urlencode({'X-Amz-Signature': hub.sign(put)})}"
            done = f"/api/complete_multipart/{upload_id}"
            return {"href": f"{hub.url}{done}?{urlencode({'X-Amz-Signature': hub.sign(done)})}", "header": header}

        def lfs_put(self, body, oid):
            if not self._signed(f"/lfs-storage/{oid}"):
                return None
            size = hub._announced.get(oid)
            if size is None:
                return self._json(404, {"error": "NoSuchUpload"})
            if not self._store(oid, size, body):
                return None
            return self._json(200, {}, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

        def lfs_put_part(self, body, oid, upload_id, part):
            if not self._signed(f"/lfs-storage/{oid}/{upload_id}/{part}"):
                return None
            upload = hub._multipart.get(upload_id)
            if upload is None or upload.oid != oid:
                return self._json(404, {"error": "NoSuchUpload"})
            upload.parts[int(part)] = body
            return self._json(200, {}, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

        def complete_multipart(self, body, upload_id):
            if not self._signed(f"/api/complete_multipart/{upload_id}"):
                return None
            upload = hub._multipart.get(upload_id)
            request = json.loads(body)
            if upload is None or request.get("oid") != upload.oid:
                return self._json(404, {"error": "NoSuchUpload"})
            numbers = [p["partNumber"] for p in request["parts"]]
            if numbers != sorted(upload.parts) or any(
                p["etag"] != f'"{hashlib.md5(upload.parts[p["partNumber"]]).hexdigest()}"' for p in request["parts"]
            ):
                return self._json(400, {"error": "InvalidPart: parts or ETags do not match the uploaded parts"})
            if not self._store(upload.oid, upload.size, b"".join(upload.parts[n] for n in numbers)):
                return None
            del hub._multipart[upload_id]
            return self._json(200, {})

        def lfs_verify(self, body, repo):
            request = json.loads(body)
            stored = hub.lfs_objects.get(request.get("oid"))
            if stored is None or len(stored) != request.get("size"):
                return self._json(404, {"message": "object not found"}, content_type=LFS_CONTENT_TYPE)
            return self._json(200, {}, content_type=LFS_CONTENT_TYPE)

        def commit(self, body, repo, rev):
            found = self._revision(repo, rev)
            if found is None:
                return None
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            staged = dict(found.branches[rev])
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    if value.get("encoding") != "base64":
                        return self._json(400, {"error": "fake hub: only base64 files"})
                    staged[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    stored = hub.lfs_objects.get(value.get("oid"))
                    if value.get("algo") != "sha256" or stored is None or len(stored) != value.get("size"):
                        return self._json(
                            422, {"error": f"Your push was rejected: LFS object of {value.get('path')} not found"}
                        )
                    staged[value["path"]] = LfsPointer(value["oid"], value["size"])
                elif item["key"] != "header":
                    return self._json(400, {"error": f"fake hub: unsupported commit item {item['key']}"})
            oid = hashlib.sha1(body).hexdigest()
            found.branches[rev] = staged  # atomic: all files or none
            found.commits.append({"oid": oid, "branch": rev, **header})
            return self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

    return Handler


_ROUTES = [  # (path regex, (method, handler, the bearer token it needs: the Hub's (True), Xet's ("xet") or none))
    (r"/api/repos/create", ("POST", "create_repo", True)),
    (r"/api/validate-yaml", ("POST", "validate_yaml", True)),
    (_REPO + r"/branch/(?P<branch>.+)", ("POST", "create_branch", True)),
    (_REPO + r"/preupload/(?P<rev>.+)", ("POST", "preupload", True)),
    (_REPO + r"/commit/(?P<rev>.+)", ("POST", "commit", True)),
    (_REPO + r"/xet-write-token/(?P<rev>.+)", ("GET", "xet_write_token", True)),
    (r"/cas/v1/chunks/[\w-]+/(?P<hash>[0-9a-f]{64})", ("GET", "xet_chunk", "xet")),
    (r"/cas/v1/xorbs/default/(?P<hash>[0-9a-f]{64})", ("POST", "xet_xorb", "xet")),
    (r"/cas/v1/shards", ("POST", "xet_shard", "xet")),
    (_GIT + r"/batch", ("POST", "lfs_batch", True)),
    (_GIT + r"/verify", ("POST", "lfs_verify", True)),
    (r"/lfs-storage/(?P<oid>[0-9a-f]{64})", ("PUT", "lfs_put", False)),
    (r"/lfs-storage/(?P<oid>[0-9a-f]{64})/(?P<upload_id>\w+)/(?P<part>\d+)", ("PUT", "lfs_put_part", False)),
    (r"/api/complete_multipart/(?P<upload_id>\w+)", ("POST", "complete_multipart", False)),
]


def xet_hash_string(raw: bytes) -> str:
    """A 32-byte Xet hash as its URL string: each 8-byte quarter read as a little-endian u64, in hex."""
    return "".join(f"{v:016x}" for v in struct.unpack("<4Q", raw))


def xorb_chunks(xorb: bytes) -> list[bytes]:
    """The chunks of a serialized xorb, decompressed. Each chunk: version u8 (0), compressed size u24,
    compression u8 (0 none, 1 LZ4, 2 byte-grouping-4 + LZ4), uncompressed size u24, data. The client uploads the
    chunks alone; a stored xorb may end with a footer and its u32 length, which are skipped."""
    import lz4.frame

    pos, chunks = 0, []
    while pos < len(xorb):
        version, c0, c1, c2, scheme, u0, u1, u2 = struct.unpack("<8B", xorb[pos : pos + 8].ljust(8, b"\xff"))
        if (version != 0 or scheme > 2) and struct.unpack("<I", xorb[-4:])[0] == len(xorb) - pos - 4:
            break  # the footer
        size, raw_size = c0 | c1 << 8 | c2 << 16, u0 | u1 << 8 | u2 << 16
        data = xorb[pos + 8 : pos + 8 + size]
        if version != 0 or scheme > 2 or len(data) != size:
            raise ValueError(f"chunk {len(chunks)} at byte {pos}: version {version}, compression {scheme}")
        pos += 8 + size
        if scheme in (1, 2):
            data = lz4.frame.decompress(data)
        if scheme == 2:
            data = _ungroup4(data)
        if len(data) != raw_size:
            raise ValueError(f"chunk {len(chunks)}: {len(data)} bytes, its header says {raw_size}")
        chunks.append(data)
    return chunks


def _ungroup4(data: bytes) -> bytes:
    """Undo byte grouping: the bytes of position 0, 1, 2, 3 of every 4 were stored group after group (the first
    ``len % 4`` groups one byte longer)."""
    n, extra = divmod(len(data), 4)
    sizes = [n + (1 if g < extra else 0) for g in range(4)]
    starts = [sum(sizes[:g]) for g in range(4)]
    out = bytearray(len(data))
    for g in range(4):
        out[g::4] = data[starts[g] : starts[g] + sizes[g]]
    return bytes(out)


def shard_files(shard: bytes) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """The files a shard upload registers: (sha256 hex from its metadata extension, [(xorb hash, first chunk,
    end chunk)]). Layout: 48-byte header, then per file a 48-byte header (hash, flags u32, entries u32), its
    48-byte entries (xorb hash, flags u32, bytes u32, chunk start u32, chunk end u32), verification entries and
    the metadata extension (sha256) when flagged; a bookend of 32 0xFF bytes ends the section."""
    version, _ = struct.unpack("<QQ", shard[32:48])
    if version != 2:
        raise ValueError(f"shard header version {version}")
    pos, files = 48, []
    while True:
        file_hash, flags, count = struct.unpack("<32sII", shard[pos : pos + 40])
        pos += 48
        if file_hash == b"\xff" * 32:
            return files
        terms = []
        for _ in range(count):
            xorb, _, _, first, end = struct.unpack("<32sIIII", shard[pos : pos + 48])
            terms.append((xet_hash_string(xorb), first, end))
            pos += 48
        if flags & 1 << 31:
            pos += 48 * count  # verification entries: the sha256 check below covers the bytes
        if not flags & 1 << 30:
            raise ValueError("a file without its sha256 (metadata extension): required for git-based repos")
        files.append((xet_hash_string(shard[pos : pos + 32]), terms))  # stored as a Xet hash, quarters reversed
        pos += 48
