"""`stctl repo serve`: the embedded static server for the repository folder, with HTTP Range.

Rules: serves regular files under the repository folder only (no listings, no paths outside
it); answers a single `Range: bytes=` request with 206 and `Content-Range` (416 when it cannot
be satisfied) so devices resume interrupted downloads; `timestamp.json` and `root.json` (the
only names whose content changes) are sent with `Cache-Control: no-cache`, everything else is
immutable. Any static server (nginx, a CDN, S3, `python -m http.server`) can serve the same
folder; Range only makes resumes cheaper.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from manifests.release import METADATA_DIR
from stctl.errors import WorkspaceError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_MUTABLE = ("timestamp.json", "root.json")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, or None if it cannot be satisfied."""
    m = _RANGE.match(header.strip())
    if not m or m.group(1) == m.group(2) == "":
        return None
    if m.group(1) == "":  # suffix: the last N bytes
        n = int(m.group(2))
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else None
    first = int(m.group(1))
    last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    return (first, last) if first <= last else None


class RepositoryHandler(SimpleHTTPRequestHandler):
    """GET/HEAD of repository files, with single-range support."""

    protocol_version = "HTTP/1.1"

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "not found")
        return None

    def send_head(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return None
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        first, last, status = 0, size - 1, HTTPStatus.OK
        if "Range" in self.headers:
            span = parse_range(self.headers["Range"], size)
            if span is None:
                f.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            (first, last), status = span, HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if path.endswith(".json") else "application/octet-stream")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        immutable = os.path.basename(path) not in _MUTABLE
        self.send_header("Cache-Control", "public, max-age=31536000, immutable" if immutable else "no-cache")
        self.end_headers()
        f.seek(first)
        self._remaining = last - first + 1
        return f

    def copyfile(self, source, outputfile):
        """Send exactly the requested span."""
        remaining = self._remaining
        while remaining > 0:
            chunk = source.read(min(remaining, 1 << 16))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)

    def log_message(self, format, *args):
        if not getattr(self.server, "quiet", True):
            super().log_message(format, *args)


class RepositoryServer(ThreadingHTTPServer):
    """Serves each request in its own thread; a client that hangs up mid-download (a device
    that lost power or its link) is routine here and is not reported as a server error."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)


def make_server(repository_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080,
                handler: type[RepositoryHandler] = RepositoryHandler, quiet: bool = True) -> RepositoryServer:
    """An HTTP server for `repository_dir` (call `serve_forever()`; port 0 picks a free port)."""
    root = Path(repository_dir)
    if not (root / METADATA_DIR / "timestamp.json").is_file():
        raise WorkspaceError(f"{root}: not a TUF repository folder (no {METADATA_DIR}/timestamp.json)")
    server = RepositoryServer((host, port), functools.partial(handler, directory=str(root)))
    server.quiet = quiet
    return server
