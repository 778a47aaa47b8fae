"""A small stand-in for the Hugging Face Hub on 127.0.0.1: the routes huggingface_hub uses.

Repository info (/api/models/...), file listing (.../tree/...), and file downloads
(/{repo}/resolve/{revision}/{file}, HEAD and GET with Range). huggingface_hub runs against it
for real through HF_ENDPOINT; no test reaches the internet. `bytes_per_second` throttles
downloads (`file_bytes_per_second` one file) so tests can watch progress and cancel midway.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Path]] = {}
        self.bytes_per_second: float | None = None
        self.file_bytes_per_second: dict[str, float] = {}  # per file name, over bytes_per_second
        self.fail_status: int | None = None  # when set, every route answers this status (a broken hub)
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
                hub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def add_repo(self, repo_id: str, files: dict[str, Path]) -> None:
        self.repos[repo_id] = files

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- routes ---------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{'HEAD' if head else 'GET'} {path}")
        if self.fail_status is not None:
            self._json(handler, self.fail_status, {"error": "the hub is having a bad day"})
            return
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+(?:/.*)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        if tree:
            self._tree(handler, tree.group(1))
        elif api:
            self._info(handler, api.group(1))
        elif resolve:
            self._file(handler, resolve.group(1), resolve.group(2), head)
        else:
            self._json(handler, 404, {"error": "not found"})

    def _missing(self, handler: BaseHTTPRequestHandler, what: str) -> None:
        self._json(handler, 404, {"error": f"{what} not found"},
                   {"X-Error-Code": "RepositoryNotFound", "X-Error-Message": "Repository not found"})

    def _info(self, handler: BaseHTTPRequestHandler, repo_id: str) -> None:
        files = self.repos.get(repo_id)
        if files is None:
            self._missing(handler, repo_id)
            return
        self._json(handler, 200, {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                                  "tags": ["gguf"], "siblings": [{"rfilename": name} for name in files]})

    def _tree(self, handler: BaseHTTPRequestHandler, repo_id: str) -> None:
        files = self.repos.get(repo_id)
        if files is None:
            self._missing(handler, repo_id)
            return
        self._json(handler, 200, [{"type": "file", "path": name, "size": p.stat().st_size,
                                   "oid": hashlib.sha1(name.encode()).hexdigest()} for name, p in files.items()])

    def _file(self, handler: BaseHTTPRequestHandler, repo_id: str, name: str, head: bool) -> None:
        files = self.repos.get(repo_id)
        if files is None:
            self._missing(handler, repo_id)
            return
        path = files.get(name)
        if path is None:
            self._json(handler, 404, {"error": "entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
        body = data[start:]
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("ETag", f'"{etag}"')
        handler.send_header("X-Linked-Etag", f'"{etag}"')
        handler.send_header("X-Linked-Size", str(len(data)))
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("Accept-Ranges", "bytes")
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if head:
            return
        step = 64 * 1024
        rate = self.file_bytes_per_second.get(name, self.bytes_per_second)
        try:
            for offset in range(0, len(body), step):
                handler.wfile.write(body[offset: offset + step])
                if rate:
                    time.sleep(step / rate)
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def _json(handler: BaseHTTPRequestHandler, status: int, body: object,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)
