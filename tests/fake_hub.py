"""A local stand-in for the Hub's model-download API, enough for ``huggingface_hub.snapshot_download``.

It serves the files of local folders as model repositories at one commit: the revision endpoint
(``/api/models/ORG/NAME/revision/REV``), its file listing (``.../tree/REV``) and ``/ORG/NAME/resolve/REV/FILE`` with the headers the
client reads (commit, ETag, size). Every request is counted, so a test can show that a later run
asked nothing.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._send(handler, 404, b'{"error": "Repository not found"}', {}, body)
            if len(parts) > 4 and parts[4] == "tree":  # the file listing of a commit
                entries = [
                    {
                        "type": "file",
                        "path": p.relative_to(self.repos[repo]).as_posix(),
                        "size": p.stat().st_size,
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                    }
                    for p in self._files(repo)
                ]
                return self._send(
                    handler, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body
                )
            siblings = [{"rfilename": p.relative_to(self.repos[repo]).as_posix()} for p in self._files(repo)]
            payload = {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings, "private": False}
            return self._send(handler, 200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            file = self.repos.get(repo, Path("/nonexistent")) / name
            if not file.is_file():
                return self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
            data = file.read_bytes()
            etag = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            return self._send(handler, 200, data, headers, body)
        return self._send(handler, 404, b"", {}, body)

    def _files(self, repo: str) -> list[Path]:
        return sorted(p for p in self.repos[repo].rglob("*") if p.is_file())

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
