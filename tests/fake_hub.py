"""A local stand-in for the Hugging Face Hub's HTTP API, for tests: the real `huggingface_hub`
client, and `datasets.load_dataset` through it, talk to it as they talk to huggingface.co.

    from tests.fake_hub import HubUser, fake_hub_server

    with fake_hub_server({"hf_alice": HubUser("alice")}) as hub:
        HfApi(endpoint=hub.url, token="hf_alice").create_repo("alice/data", repo_type="dataset")
        hub.repo("dataset", "alice/data").files()     # path -> bytes at the head of main
        hub.requests                                  # every request: (method, path, status)
        hub.fail_next(2, 503, r"/commit/")            # the next 2 matching requests answer 503
        hub.before_commit = lambda repo: ...          # runs as a commit request arrives (to race it)

Each repo keeps its history of commits (each a tree: path -> content hash) in memory, and file
contents as content-addressed blobs in a folder, so a revision can be any commit's id. Tokens
are checked as the Hub checks them: an unknown bearer token is refused (401 "Invalid credentials
in Authorization header") on every route, a write needs a token whose user owns the namespace
(or belongs to it as an org) and may write (403 otherwise), a private repo is visible to its
namespace only (404 RepoNotFound to everyone else).

Routes (those huggingface_hub 2.4 uses to create, upload, list and download):
`POST /api/repos/create`, `DELETE /api/repos/delete`, `GET /api/whoami-v2`, `POST /api/validate-yaml`,
`GET /api/{type}s/{repo}[/revision/{rev}]`,
`POST /api/{type}s/{repo}/preupload/{rev}`, the LFS batch API
`POST /[datasets/]{repo}.git/info/lfs/objects/batch` with its basic-transfer `PUT` and verify,
`POST /api/{type}s/{repo}/commit/{rev}` (ndjson: regular files, LFS files, deletions; a stale
`parentCommit` is answered 412 as on the Hub), `GET /api/{type}s/{repo}/tree/{rev}[/{path}]`,
`POST /api/{type}s/{repo}/paths-info/{rev}`, and `GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}`
(with byte ranges). A file goes to LFS when the repo's `.gitattributes` says so, when it is
10 MiB or more, or when its sample holds a NUL byte. Not served: Xet storage (a client must run
with `HF_HUB_DISABLE_XET`, and falls back to LFS), multipart LFS, branches other than `main`, pull
requests, pagination (a listing is one page).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import re
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024
INITIAL_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.safetensors", "*.parquet", "*.arrow", "*.pt", "*.gz", "*.zip", "*.npy")
)
REPO = r"(?P<repo>[^/]+/[^/]+)"
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass(frozen=True)
class HubUser:
    """Whom a token speaks for: a user, the orgs it belongs to, and whether it may write."""

    name: str
    orgs: tuple[str, ...] = ()
    write: bool = True

    def owns(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


@dataclass(frozen=True)
class Entry:
    """A file in a commit: its content's sha256 (the blob's name) and size, stored in LFS or not."""

    sha256: str
    size: int
    lfs: bool

    def git_oid(self, store: Path) -> str:
        """The git blob id: of the content itself, or of the LFS pointer file that stands for it."""
        data = self.pointer() if self.lfs else (store / self.sha256).read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
        )


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, Entry]
    changed: tuple[str, ...] = ()  # the paths this commit added, replaced or deleted


@dataclass
class Repo:
    """One repo of the fake: its type, id, visibility and history (the last commit is main's head)."""

    type: str
    repo_id: str
    private: bool
    store: Path
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """Every file's content at `revision`."""
        commit = self.at(revision)
        if commit is None:
            raise KeyError(revision)
        return {path: (self.store / e.sha256).read_bytes() for path, e in sorted(commit.files.items())}


class HubError(Exception):
    """An answer other than 2xx, with the Hub's error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, header_message: str | None = None,
                 extra: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.header_message = header_message
        self.extra = dict(extra or {})


class FakeHub:
    """The state behind the server: users by token, repos, blobs, the request log and faults."""

    def __init__(self, tokens: Mapping[str, HubUser], root: Path):
        self.tokens = dict(tokens)
        self.root = root
        self.store = root / "blobs"
        self.store.mkdir(parents=True, exist_ok=True)
        self.url = ""
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self.errors: list[str] = []  # tracebacks of requests the fake itself failed on (answered 500)
        self.before_commit: Callable[[Repo], None] | None = None  # runs as a commit request arrives
        self._faults: list[list[Any]] = []  # [remaining, status, compiled pattern]

    # -- what tests look at and arrange --------------------------------------------------------

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        return self.repos[(repo_type, repo_id)]

    def add_file(self, repo: Repo, path: str, data: bytes, title: str = "a commit from elsewhere") -> Commit:
        """Commit one regular file on main, as another client would."""
        return self.commit(repo, title, None, [("file", {"path": path, "content": base64.b64encode(data).decode()})])

    def fail_next(self, count: int, status: int = 503, path_pattern: str = "") -> None:
        """Answer the next `count` requests whose path matches `path_pattern` with `status`."""
        with self.lock:
            self._faults.append([count, status, re.compile(path_pattern)])

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def requests_to(self, pattern: str, method: str | None = None) -> list[tuple[str, str, int]]:
        """The logged requests whose path matches `pattern` (and of `method`, when given)."""
        rx = re.compile(pattern)
        return [r for r in self.requests if rx.search(r[1]) and (method is None or r[0] == method)]

    def injected_fault(self, path: str) -> int | None:
        with self.lock:
            for fault in self._faults:
                if fault[0] > 0 and fault[2].search(path):
                    fault[0] -= 1
                    return fault[1]
        return None

    # -- storage -------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.store / sha
        if not target.exists():
            tmp = target.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return sha

    def has_blob(self, sha256: str) -> bool:
        return (self.store / sha256).is_file()

    def create_repo(self, user: HubUser, repo_type: str, repo_id: str, private: bool) -> tuple[Repo, bool]:
        """The repo, and whether it was created now (False: it existed)."""
        with self.lock:
            existing = self.repos.get((repo_type, repo_id))
            if existing is not None:
                return existing, False
            repo = Repo(repo_type, repo_id, private, self.store)
            attributes = INITIAL_GITATTRIBUTES.encode()
            files = {".gitattributes": Entry(self.put_blob(attributes), len(attributes), lfs=False)}
            repo.commits.append(Commit(_oid("initial", repo_type, repo_id), None, "initial commit", _now(), files))
            self.repos[(repo_type, repo_id)] = repo
            return repo, True

    def commit(self, repo: Repo, title: str, parent: str | None, changes: list[tuple[str, dict[str, Any]]]) -> Commit:
        with self.lock:
            if parent is not None and parent != repo.head.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.head.files)
            for key, value in changes:
                path = value["path"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[path] = Entry(self.put_blob(data), len(data), lfs=False)
                elif key == "lfsFile":
                    if not self.has_blob(value["oid"]):
                        raise HubError(422, f"Your push was rejected: the LFS file {path} was not uploaded")
                    files[path] = Entry(value["oid"], (self.store / value["oid"]).stat().st_size, lfs=True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [n for n in files if n.startswith(prefix)]:
                        del files[name]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            commit = Commit(_oid(repo.head.oid, title, json.dumps(changes, sort_keys=True), str(time.time_ns())),
                            repo.head.oid, title, _now(), files, tuple(value["path"] for _, value in changes))
            repo.commits.append(commit)
            return commit

    def lfs_patterns(self, commit: Commit) -> list[str]:
        entry = commit.files.get(".gitattributes")
        if entry is None:
            return []
        lines = (self.store / entry.sha256).read_text().splitlines()
        return [line.split()[0] for line in lines if "filter=lfs" in line]

    def upload_mode(self, commit: Commit, path: str, size: int, sample: bytes) -> str:
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in self.lfs_patterns(commit)):
            return "lfs"
        return "lfs" if size >= LFS_THRESHOLD or b"\0" in sample else "regular"

    def repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.type]}{repo.repo_id}"


def _oid(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # the test log stays quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- dispatch ------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body()
        status = hub.injected_fault(url.path)
        try:
            if status is not None:
                raise HubError(status, "injected fault")
            self.user = self._user()
            for route_method, pattern, name in ROUTES:
                match = pattern.fullmatch(url.path)
                if match and (route_method == method or (method == "HEAD" and route_method == "GET")):
                    status = getattr(self, name)(method, **{k: unquote(v) for k, v in match.groupdict().items() if v})
                    break
            else:
                raise HubError(404, f"no route for {method} {url.path}")
        except HubError as exc:
            status = exc.status
            self._send_error(exc, method)
        except Exception:
            status = 500
            with hub.lock:
                hub.errors.append(traceback.format_exc())
            self._send_error(HubError(500, "the fake Hub failed on this request"), method)
        with hub.lock:
            hub.requests.append((method, url.path, status))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _user(self) -> HubUser | None:
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        user = self.server.hub.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header",
                           header_message="Invalid credentials in Authorization header")
        return user

    # -- answers -------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] = {},
              head: bool = False) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        return status

    def _json(self, data: Any, status: int = 200, content_type: str = "application/json") -> int:
        return self._send(status, json.dumps(data).encode(), content_type)

    def _send_error(self, exc: HubError, method: str) -> None:
        headers = {"X-Error-Message": exc.header_message or exc.message}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        self._send(exc.status, json.dumps({"error": exc.message, **exc.extra}).encode(), "application/json", headers,
                   head=method == "HEAD")

    # -- access --------------------------------------------------------------------------------

    def _readable(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.server.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and (self.user is None or not self.user.owns(repo.namespace))):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _writable(self, repo_type: str, repo_id: str) -> Repo:
        if self.user is None:
            raise HubError(401, "Authorization header is required to write", code="RepoNotFound")
        repo = self._readable(repo_type, repo_id)
        if not self.user.owns(repo.namespace) or not self.user.write:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _revision(repo: Repo, revision: str) -> Commit:
        commit = repo.at(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # -- routes --------------------------------------------------------------------------------

    def create_repo(self, method: str) -> int:
        hub = self.server.hub
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = json.loads(self.body or b"{}")
        namespace = payload.get("organization") or self.user.name
        repo_type = payload.get("type") or "model"
        if not self.user.owns(namespace) or not self.user.write:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace!r}")
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        repo, created = hub.create_repo(self.user, repo_type, f"{namespace}/{payload['name']}", private)
        if not created:
            # The Hub names the existing repo, and the client reads it from there.
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": hub.repo_url(repo)})
        return self._json({"url": hub.repo_url(repo), "name": repo.repo_id, "id": repo.repo_id})

    def delete_repo(self, method: str) -> int:
        hub = self.server.hub
        payload = json.loads(self.body or b"{}")
        repo_id = f"{payload.get('organization') or (self.user.name if self.user else '')}/{payload.get('name')}"
        repo = self._writable(payload.get("type") or "model", repo_id)
        with hub.lock:
            del hub.repos[(repo.type, repo.repo_id)]
        return self._json({})

    def whoami(self, method: str) -> int:
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header",
                           header_message="Invalid credentials in Authorization header")
        return self._json({"type": "user", "name": self.user.name, "orgs": [{"name": o} for o in self.user.orgs],
                           "auth": {"accessToken": {"role": "write" if self.user.write else "read"}}})

    def validate_yaml(self, method: str) -> int:
        import yaml

        content = json.loads(self.body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as exc:
                return self._json({"errors": [{"message": f"Invalid YAML: {exc}"}], "warnings": []}, status=400)
            if metadata is not None and not isinstance(metadata, dict):
                return self._json({"errors": [{"message": "the metadata must be a mapping"}], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def repo_info(self, method: str, kind: str, repo: str, rev: str = "main") -> int:
        found = self._readable(TYPES[kind], repo)
        commit = self._revision(found, rev)
        blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [self._sibling(path, entry, blobs) for path, entry in sorted(commit.files.items())]
        return self._json({
            "_id": _oid(found.type, found.repo_id)[:24], "id": found.repo_id, "author": found.namespace,
            "sha": commit.oid, "lastModified": commit.date, "createdAt": found.commits[0].date,
            "private": found.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "cardData": self._card_data(found, commit), "siblings": siblings,
        })

    def _sibling(self, path: str, entry: Entry, blobs: bool) -> dict[str, Any]:
        sibling: dict[str, Any] = {"rfilename": path}
        if blobs:
            sibling.update(size=entry.size, blobId=entry.git_oid(self.server.hub.store))
            if entry.lfs:
                sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": len(entry.pointer())}
        return sibling

    def _card_data(self, repo: Repo, commit: Commit) -> dict[str, Any] | None:
        import yaml

        entry = commit.files.get("README.md")
        if entry is None:
            return None
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", (repo.store / entry.sha256).read_text(), re.DOTALL)
        try:
            data = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError:  # a card committed around validate-yaml: the Hub shows no metadata
            return None
        return data if isinstance(data, dict) else None

    def preupload(self, method: str, kind: str, repo: str, rev: str) -> int:
        found = self._writable(TYPES[kind], repo)
        commit = self._revision(found, rev)
        answers = []
        for item in json.loads(self.body)["files"]:
            path = item["path"]
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid(self.server.hub.store)
            mode = self.server.hub.upload_mode(commit, path, item["size"], base64.b64decode(item["sample"]))
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._json({"files": answers, "commitOid": commit.oid})

    def lfs_batch(self, method: str, prefix: str | None = None, repo: str = "") -> int:
        self._writable(_type_of_prefix(prefix), repo)
        payload = json.loads(self.body)
        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads are served")
        objects = []
        for item in payload["objects"]:
            answer: dict[str, Any] = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if not self.server.hub.has_blob(item["oid"]):
                answer["actions"] = {
                    "upload": {"href": f"{self.server.hub.url}/lfs-objects/{item['oid']}", "header": {}},
                    "verify": {"href": f"{self.server.hub.url}/lfs-objects/{item['oid']}/verify", "header": {}},
                }
            objects.append(answer)
        return self._json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, method: str, oid: str) -> int:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"the uploaded content does not hash to {oid}")
        self.server.hub.put_blob(self.body)
        return self._send(200, b"", "text/plain")

    def lfs_verify(self, method: str, oid: str) -> int:
        if self.user is None:
            raise HubError(401, "Authorization header is required")
        payload = json.loads(self.body)
        path = self.server.hub.store / oid
        if not path.is_file() or path.stat().st_size != payload["size"]:
            raise HubError(404, f"object {oid} was not uploaded")
        return self._json({"success": True})

    def commit(self, method: str, kind: str, repo: str, rev: str) -> int:
        hub = self.server.hub
        found = self._writable(TYPES[kind], repo)
        if rev != "main":
            raise HubError(400, "the fake Hub commits to main only")
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        if hub.before_commit is not None:
            hub.before_commit(found)
        changes = [(line["key"], line["value"]) for line in lines if line["key"] != "header"]
        commit = hub.commit(found, header.get("summary", ""), header.get("parentCommit"), changes)
        return self._json({"success": True, "commitOid": commit.oid, "pullRequestUrl": None, "hookOutput": "",
                           "commitUrl": f"{hub.repo_url(found)}/commit/{commit.oid}"})

    def tree(self, method: str, kind: str, repo: str, rev: str, path: str = "") -> int:
        found = self._readable(TYPES[kind], repo)
        commit = self._revision(found, rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        expand = self.query.get("expand", ["false"])[0].lower() == "true"
        base = path.strip("/")
        if base and base not in commit.files and not _folders(commit, base):
            raise HubError(404, f"{base} does not exist on main", code="EntryNotFound")
        if base in commit.files:
            return self._json([self._entry(commit, base, expand)])
        prefix = f"{base}/" if base else ""
        names = set()
        for name in commit.files:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            if recursive:
                names.update(prefix + "/".join(rest[:i]) for i in range(1, len(rest) + 1))
            else:
                names.add(prefix + rest[0])
        return self._json([self._entry(commit, name, expand) for name in sorted(names)])

    def paths_info(self, method: str, kind: str, repo: str, rev: str) -> int:
        found = self._readable(TYPES[kind], repo)
        commit = self._revision(found, rev)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            payload = json.loads(self.body)
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() == "true"
        known = [p.strip("/") for p in paths if p.strip("/") in commit.files or _folders(commit, p.strip("/"))]
        return self._json([self._entry(commit, p, expand) for p in known])

    def _entry(self, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        store = self.server.hub.store
        entry = commit.files.get(path)
        if entry is None:
            data: dict[str, Any] = {"type": "directory", "oid": _oid("tree", commit.oid, path), "size": 0, "path": path}
        else:
            data = {"type": "file", "oid": entry.git_oid(store), "size": entry.size, "path": path}
            if entry.lfs:
                data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(entry.pointer())}
        if expand:
            data["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
        return data

    def resolve(self, method: str, prefix: str | None = None, repo: str = "", rev: str = "", path: str = "") -> int:
        hub = self.server.hub
        found = self._readable(_type_of_prefix(prefix), repo)
        commit = self._revision(found, rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        data = (hub.store / entry.sha256).read_bytes()
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes",
                   "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid(hub.store)}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        status = 200
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted.group(1))
            end = min(int(wanted.group(2)) if wanted.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data) and data:
                raise HubError(416, "Requested range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        return self._send(status, data, "application/octet-stream", headers, head=method == "HEAD")


def _type_of_prefix(prefix: str | None) -> str:
    return {"datasets/": "dataset", "spaces/": "space"}.get(prefix or "", "model")


def _folders(commit: Commit, path: str) -> bool:
    prefix = path.rstrip("/") + "/"
    return any(name.startswith(prefix) for name in commit.files)


KIND = r"(?P<kind>models|datasets|spaces)"
PREFIX = r"(?P<prefix>datasets/|spaces/)?"
ROUTES = [
    (method, re.compile(pattern), name)
    for method, pattern, name in (
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/{KIND}/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("POST", rf"/api/{KIND}/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/{KIND}/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", rf"/api/{KIND}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", rf"/api/{KIND}/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("POST", rf"/{PREFIX}{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("POST", r"/lfs-objects/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
        ("GET", rf"/{PREFIX}{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    )
]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


@contextlib.contextmanager
def fake_hub_server(tokens: Mapping[str, HubUser], root: str | Path | None = None) -> Iterator[FakeHub]:
    """The fake Hub on 127.0.0.1 at a free port, in a thread, its repos under `root` (a temporary
    folder when none is given); stopped on exit."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="fake-hub-"))
        hub = FakeHub(tokens, Path(root))
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.hub = hub
        hub.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        thread = threading.Thread(target=httpd.serve_forever, name="fake-hub-http", daemon=True)
        thread.start()
        try:
            yield hub
        finally:
            httpd.shutdown()
            httpd.server_close()


def load_dataset_in_subprocess(
    endpoint: str, token: str, wanted: list[tuple[str, str | None]], home: Path, xet: bool = False
) -> list[list[dict[str, Any]]]:
    """The records `datasets.load_dataset(repo, config, split="train")` reads for each wanted
    pair, from the Hub at `endpoint`, in a fresh process (huggingface_hub and datasets read
    HF_ENDPOINT and the offline flags at import) with its own cache under `home`."""
    import os
    import subprocess
    import sys

    code = (
        "import datasets, json, sys\n"
        "wanted = json.loads(sys.argv[1])\n"
        "print(json.dumps([datasets.load_dataset(r, c, split='train').to_list() for r, c in wanted], default=str))\n"
    )
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_TOKEN=token, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
               HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1")
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(wanted)], env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"load_dataset failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

