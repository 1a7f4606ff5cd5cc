"""A local stand-in for the Hugging Face hub, speaking the endpoints huggingface_hub calls.

- ``GET /api/models/{repo}[/revision/{rev}]``: the repo's commit and files (``blobs=true`` adds sizes,
  git blob ids and LFS sha256), or 404 with ``X-Error-Code: RepoNotFound``.
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: regular files answer directly with ``X-Repo-Commit`` and
  ``ETag`` (the git blob id); LFS files (weights) answer 302 to a "CDN" on another loopback address,
  with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``, as the real hub does.
- ``GET /cdn/{sha256}``: the bytes, honouring ``Range: bytes=N-`` with 206.

``drop_once`` names files whose first GET sends half the body and then drops the connection.
``stall`` names files whose GET sends a first MiB, sets ``stalled`` and waits for ``release``
(a download in progress, for interrupting). ``corrupt`` names files served with other bytes of the
same length. ``requests`` records (method, path, Range header), ``authorizations`` each request's
Authorization header.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    stall: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    authorizations: list[str | None] = field(default_factory=list)
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""
    cdn_url: str = ""

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        self.repos[repo_id] = files
        self.commits[repo_id] = hashlib.sha1(repo_id.encode()).hexdigest()
        return self.commits[repo_id]

    def blob(self, sha256: str) -> bytes | None:
        for files in self.repos.values():
            for data in files.values():
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data
        return None

    def fetched(self, suffix: str) -> list[tuple[str, str, str | None]]:
        """GET requests for file bodies whose path ends with ``suffix`` (resolve or CDN)."""
        names = {hashlib.sha256(d).hexdigest(): n for f in self.repos.values() for n, d in f.items()}
        out = []
        for method, path, rng in self.requests:
            name = names.get(path.removeprefix("/cdn/"), path) if path.startswith("/cdn/") else path
            if method == "GET" and "/api/" not in path and name.endswith(suffix):
                out.append((method, name, rng))
        return out


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            return None

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
            hub.authorizations.append(self.headers.get("Authorization"))
            if path.startswith("/api/models/"):
                return self._info(path.removeprefix("/api/models/"))
            if path.startswith("/cdn/"):
                return self._cdn(path.removeprefix("/cdn/"), head)
            if "/resolve/" in path:
                return self._resolve(path.lstrip("/"), head)
            return self._send(404, b"", {})

        def _info(self, rest: str) -> None:
            repo_id, _, revision = rest.partition("/revision/")
            if repo_id not in hub.repos:
                return self._send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            if revision not in ("", "main", hub.commits[repo_id]):
                return self._send(404, b'{"error":"Revision not found"}', {"X-Error-Code": "RevisionNotFound"})
            siblings = []
            for name, data in hub.repos[repo_id].items():
                entry = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                siblings.append(entry)
            body = {"id": repo_id, "modelId": repo_id, "sha": hub.commits[repo_id], "siblings": siblings}
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _resolve(self, path: str, head: bool) -> None:
            repo_part, _, rest = path.partition("/resolve/")
            _revision, _, name = rest.partition("/")
            files = hub.repos.get(repo_part)
            if files is None:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"})
            commit = {"X-Repo-Commit": hub.commits[repo_part]}
            if name not in files:
                return self._send(404, b"", {**commit, "X-Error-Code": "EntryNotFound"})
            data = files[name]
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                headers = {**commit, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                           "ETag": f'"{git_blob_id(data)}"', "Location": f"{hub.cdn_url}/cdn/{sha}"}  # fmt: skip
                return self._send(302, b"", headers)
            headers = {**commit, "ETag": f'"{git_blob_id(data)}"'}
            self._send(200, b"" if head else data, {**headers, "Content-Length": str(len(data))}, head)

        def _cdn(self, sha: str, head: bool) -> None:
            data = hub.blob(sha)
            if data is None:
                return self._send(404, b"", {})
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers.get("Range") else 0
            key = next((n for f in hub.repos.values() for n, d in f.items() if d is data), "")
            if not head and key in hub.drop_once and start == 0:
                hub.drop_once.discard(key)
                return self._drop(data)
            if not head and key in hub.stall:
                return self._stall(data)
            if key in hub.corrupt:
                data = bytes(b ^ 0xFF for b in data)
            status = 206 if start else 200
            headers = {"Content-Length": str(len(data) - start), "ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(status, b"" if head else data[start:], headers, head)

        def _drop(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True

        def _stall(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: 2**20])
            self.wfile.flush()
            hub.stalled.set()
            hub.release.wait(30)
            self.close_connection = True

        def _send(self, status: int, body: bytes, headers: dict, head: bool = False) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

    return Handler


class FakeHubServer:
    """Runs a FakeHub: the hub on 127.0.0.1 and its "CDN" on 127.0.0.2 (another host to the client)."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self._servers = [ThreadingHTTPServer((host, 0), _handler(hub)) for host in ("127.0.0.1", "127.0.0.2")]
        hub.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        hub.cdn_url = f"http://127.0.0.2:{self._servers[1].server_address[1]}"

    def __enter__(self) -> FakeHub:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


class FakeModelScope:
    """The ModelScope endpoints its client calls for a download (point MODELSCOPE_ENDPOINT here):
    ``GET /api/v1/models/{repo}/repo/files`` (listing with sizes and sha256) and
    ``GET /api/v1/models/{repo}/repo?FilePath=...`` (a file); anything else is 404."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeModelScope:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _body(self, path: str, query: dict) -> bytes | None:
        repo_id, _, rest = path.removeprefix("/api/v1/models/").rpartition("/repo")
        files = self.repos.get(repo_id)
        if files is None:
            return None
        if rest == "/files":
            listing = [{"Path": n, "Name": n, "Type": "blob", "Size": len(d), "Sha256": hashlib.sha256(d).hexdigest()}
                       for n, d in files.items()]  # fmt: skip
            return json.dumps({"Code": 200, "Success": True, "Data": {"Files": listing}}).encode()
        return files.get(query.get("FilePath", [""])[0]) if rest == "" else None

    def _handler(self):
        from urllib.parse import parse_qs

        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                return None

            def do_GET(self) -> None:
                parsed = urlparse(self.path)
                fake.requests.append(self.path)
                body = fake._body(parsed.path, parse_qs(parsed.query))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        return Handler
