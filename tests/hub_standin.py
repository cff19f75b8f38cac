"""A local stand-in for the Hugging Face Hub's HTTP API, for tests that must not reach the network.

It serves only the routes that huggingface_hub 2.4's classic (non-Xet) upload and download paths
call, read from the installed client's source:

    GET  /api/agent-harnesses                            the client's user-agent lookup
    POST /api/repos/create                               create_repo
    POST /api/models/{repo}/branch/{branch}              create_branch
    POST /api/validate-yaml                              create_commit, when README.md is added
    POST /api/models/{repo}/preupload/{rev}              create_commit: regular or LFS per file
    POST /{repo}.git/info/lfs/objects/batch              LFS batch: where to PUT each new blob
    PUT  /_lfs/{sha256}                                  the blob itself (basic transfer)
    POST /api/models/{repo}/commit/{rev}                 NDJSON: header, file, lfsFile, deleted*
    GET  /api/models/{repo}[/revision/{rev}]             model_info / repo_info
    GET  /api/models/{repo}/tree/{rev}[/{path}]          list_repo_tree (snapshot_download)
    HEAD|GET /{repo}/resolve/{rev}/{path}                hf_hub_download

Anything else answers 404 and is recorded in `unknown`, so a test can assert that the client took
no route the stand-in does not model (a Xet upload would show up there). Files live in a temp
directory as content-addressed blobs. `fail(...)` injects transient errors. The request log keeps
method, path, status and whether the expected bearer token came with it — never header values, so
nothing secret is stored here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Like the real Hub: these suffixes (its default .gitattributes), binary content, or size over
# 10 MB go through LFS; small text files are committed inline.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".pkl",
                ".model", ".zip", ".gz", ".tar", ".npy", ".npz")
LFS_MIN_SIZE = 10 * 2**20
DEFAULT_GITATTRIBUTES = b"".join(
    f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    sha256: str
    size: int
    git_oid: str
    lfs: bool


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)   # branch → commit oid
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)  # oid → tree
    messages: dict[str, str] = field(default_factory=dict)   # oid → commit summary

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


@dataclass
class Fault:
    method: str
    path_contains: str
    status: int
    times: int


class HubStandin:
    """`with HubStandin(token=...) as hub:` serves on `hub.url` (127.0.0.1, a free port)."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.root = Path(tempfile.mkdtemp(prefix="hub-standin-"))
        (self.root / "blobs").mkdir()
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.unknown: list[str] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle and test helpers
    def __enter__(self) -> "HubStandin":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, method: str, path_contains: str, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` matching requests with `status` (before any other handling)."""
        self.faults.append(Fault(method, path_contains, status, times))

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The content of every file at a branch or commit."""
        repo = self.repos[repo_id]
        tree = repo.commits[repo.resolve(rev)]  # type: ignore[index]
        return {path: self.blob(e.sha256) for path, e in tree.items()}

    def blob(self, sha256: str) -> bytes:
        return (self.root / "blobs" / sha256).read_bytes()

    def stored_paths(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file()]

    # ----------------------------------------------------------------------------- storage model
    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / sha).write_bytes(data)
        return sha

    def _commit(self, repo: Repo, branch: str, tree: dict[str, Entry], summary: str) -> str:
        self._commit_counter += 1
        seed = f"{repo.repo_id}|{branch}|{self._commit_counter}|{summary}|{sorted(tree)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = tree
        repo.messages[oid] = summary
        repo.branches[branch] = oid
        return oid


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply sets Content-Length

    def log_message(self, *args) -> None:  # quiet: the test reads hub.log instead
        pass

    # --------------------------------------------------------------------------------- plumbing
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
               head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self._status = status

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._reply(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self._status = 0
        # Read the body first, so that a keep-alive connection stays in sync whatever we answer.
        body = self._body() if method in ("POST", "PUT") else b""
        with self.hub._lock:
            fault = next((f for f in self.hub.faults if f.times > 0 and f.method == method
                          and f.path_contains in url.path), None)
            if fault is not None:
                fault.times -= 1
                self._error(fault.status, "injected transient error")
            else:
                try:
                    self._route(method, url.path, parse_qs(url.query), body)
                except Exception as e:  # a bug in the stand-in: make it visible, not a hang
                    self._error(500, f"stand-in error: {e!r}")
            self.hub.log.append({"method": method, "path": url.path, "status": self._status,
                                 "authorized": self._authorized()})

    # ----------------------------------------------------------------------------------- routing
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "GET" and path == "/api/agent-harnesses":  # the client's user-agent lookup
            return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "PUT" and len(parts) == 2 and parts[0] == "_lfs":
            return self._lfs_put(parts[1], body)
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") \
                and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if method == "GET" and not rest:
                return self._info(repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._info(repo_id, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]),
                                  query.get("recursive", ["False"])[0].lower() == "true")
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1], json.loads(body))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, rest[1], body, query)
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._branch(repo_id, rest[1], json.loads(body or b"{}"))
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]),
                                 head=method == "HEAD")
        self.hub.unknown.append(f"{method} {path}")
        self._error(404, f"stand-in has no route {method} {path}")

    def _repo(self, repo_id: str, write: bool) -> Repo | None:
        if (write or (repo_id in self.hub.repos and self.hub.repos[repo_id].private)) \
                and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    # ------------------------------------------------------------------------------------ routes
    def _create_repo(self, payload: dict) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        if not payload.get("organization"):
            return self._error(400, "the stand-in needs a namespace: use `owner/name`")
        if payload.get("type", "model") != "model":
            return self._error(400, "the stand-in only models model repos")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._reply(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        # Like the Hub: a new repo starts with one commit holding .gitattributes.
        entry = Entry(self.hub._store(DEFAULT_GITATTRIBUTES), len(DEFAULT_GITATTRIBUTES),
                      git_blob_oid(DEFAULT_GITATTRIBUTES), lfs=False)
        self.hub._commit(repo, "main", {".gitattributes": entry}, "initial commit")
        self.hub.repos[repo_id] = repo
        self._reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            return self._reply(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        if not isinstance(meta, dict):
            return self._reply(400, {"errors": [{"message": "metadata must be a mapping"}]})
        self._reply(200, {"errors": [], "warnings": []})

    def _branch(self, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, f"branch {branch} already exists")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            return self._error(404, "starting point not found", "RevisionNotFound")
        repo.branches[branch] = start
        self._reply(200, {})

    def _preupload(self, repo_id: str, rev: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        head = repo.resolve(rev)
        tree = repo.commits[head] if head else {}
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > LFS_MIN_SIZE or b"\0" in sample
            have = tree.get(f["path"])
            # The oid the client compares with its own to skip unchanged files: sha256 for LFS
            # files, the git blob sha1 for regular ones.
            oid = None if have is None else (have.sha256 if have.lfs else have.git_oid)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._reply(200, {"files": files, "commitOid": head})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        if self._repo(repo_id, write=True) is None:
            return
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.hub.root / "blobs" / obj["oid"]).exists():  # already there: no action
                item["actions"] = {"upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}"}}
            objects.append(item)
        self._reply(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "content does not match its sha256")
        self.hub._store(body)
        self._reply(200)

    def _commit(self, repo_id: str, rev: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if query.get("create_pr"):
            return self._error(400, "the stand-in does not model pull requests")
        if rev not in repo.branches:
            return self._error(404, f"branch {rev} not found", "RevisionNotFound")
        tree = dict(repo.commits[repo.branches[rev]])
        summary = ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                data = base64.b64decode(value["content"])
                tree[value["path"]] = Entry(self.hub._store(data), len(data), git_blob_oid(data),
                                            lfs=False)
            elif key == "lfsFile":
                blob = self.hub.root / "blobs" / value["oid"]
                if not blob.exists():
                    return self._error(422, f"LFS object {value['oid']} for {value['path']} "
                                       "was never uploaded")
                pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}"
                           f"\nsize {blob.stat().st_size}\n").encode()
                tree[value["path"]] = Entry(value["oid"], blob.stat().st_size,
                                            git_blob_oid(pointer), lfs=True)
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
            else:
                return self._error(400, f"unknown commit operation {key}")
        oid = self.hub._commit(repo, rev, tree, summary)
        self._reply(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}",
                          "commitOid": oid, "pullRequestUrl": None})

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, write=False)
        if repo is None:
            return
        oid = repo.resolve(rev)
        if oid is None:
            return self._error(404, f"revision {rev} not found", "RevisionNotFound")
        self._reply(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
                          "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid])]})

    def _tree(self, repo_id: str, rev: str, sub: str, recursive: bool) -> None:
        repo = self._repo(repo_id, write=False)
        if repo is None:
            return
        oid = repo.resolve(rev)
        if oid is None:
            return self._error(404, f"revision {rev} not found", "RevisionNotFound")
        prefix = sub.strip("/") + "/" if sub else ""
        out, folders = [], set()
        for path, e in sorted(repo.commits[oid].items()):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if "/" in rel and not recursive:
                folders.add(prefix + rel.split("/")[0])
                continue
            if recursive:
                parents = rel.split("/")[:-1]
                folders.update(prefix + "/".join(parents[: i + 1]) for i in range(len(parents)))
            item = {"type": "file", "path": path, "size": e.size, "oid": e.git_oid}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
            out.append(item)
        out += [{"type": "directory", "path": f, "size": 0,
                 "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        self._reply(200, out)

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id, write=False)
        if repo is None:
            return
        oid = repo.resolve(rev)
        if oid is None:
            return self._error(404, f"revision {rev} not found", "RevisionNotFound")
        entry = repo.commits[oid].get(path)
        if entry is None:
            self._reply(404, {"error": "Entry not found"},
                        {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid}, head=head)
            return
        data = self.hub.blob(entry.sha256)
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"',
                   "Content-Type": "application/octet-stream"}
        if head:
            # A HEAD carries the length of the body a GET would send.
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._status = 200
            return
        self._reply(200, data, headers)
