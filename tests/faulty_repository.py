"""A repository server in its own process that fails on purpose, and counts what it sends.

`stctl.serve.RepositoryHandler` (the real server) with two faults a test can turn on:
- `die_after`: the process SIGKILLs itself once it has sent that many body bytes of shards
  (`/targets/blobs/...`), in the middle of a file: a repository host that goes away;
- `cut_path`, `cut_after`, `cuts`: the first `cuts` responses for that path stop after
  `cut_after` body bytes and the connection is shut down: a link that keeps breaking;
- `status_path`, `status`, `statuses`: the first `statuses` requests for that path are answered
  with HTTP `status` (an overloaded or misconfigured server).
Every body chunk sent is appended to `log` as `path<TAB>range-or-dash<TAB>body<TAB>bytes`, every
fault status as `path<TAB>-<TAB><status><TAB>0` (one write per line, so a line is whole even
when the process is killed right after it).

Tests use `FaultyRepository` (start it, kill it, start it again on the same port, read the log);
the process runs `python faulty_repository.py ARGS`.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

BLOBS = "/targets/blobs/"
START_TIMEOUT_S = 30.0


class FaultyRepository:
    """One server process at a time on a fixed port (so the device's repository URL stays valid)."""

    def __init__(self, directory: Path, log: Path):
        self.directory, self.log = directory, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, die_after: int | None = None, cut_path: str | None = None, cut_after: int = 0, cuts: int = 0,
              status_path: str | None = None, status: int = 503, statuses: int = 0) -> FaultyRepository:
        args = [sys.executable, __file__, str(self.directory), str(self.port), str(self.log)]
        if die_after is not None:
            args += ["--die-after", str(die_after)]
        if cut_path is not None:
            args += ["--cut-path", cut_path, "--cut-after", str(cut_after), "--cuts", str(cuts)]
        if status_path is not None:
            args += ["--status-path", status_path, "--status", str(status), "--statuses", str(statuses)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"repository server exited with {self.process.returncode}")
            try:  # a name that is not there: answered 404 without a body, so nothing is logged
                urllib.request.urlopen(self.url + "/ready-probe", timeout=1).close()
            except urllib.error.HTTPError:
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"repository server not ready within {START_TIMEOUT_S}s")

    def wait_killed(self, timeout: float) -> None:
        """Wait for the process to kill itself (`die_after`)."""
        assert self.process.wait(timeout=timeout) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def _rows(self) -> list[list[str]]:
        return [line.split("\t") for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def sent(self) -> list[tuple[str, str | None, int]]:
        """(path, Range header or None, body bytes) of every chunk sent so far (by every process)."""
        return [(path, None if rng == "-" else rng, int(n)) for path, rng, kind, n in self._rows() if kind == "body"]

    def statuses_sent(self, path: str) -> list[int]:
        """The fault statuses answered for `path`, in order."""
        return [int(kind) for p, _, kind, _ in self._rows() if p == path and kind != "body"]

    def bytes_sent(self, prefix: str = "/") -> int:
        return sum(n for path, _, n in self.sent() if path.startswith(prefix))

    def requests(self, path: str) -> dict[str | None, int]:
        """Range header (None: the whole file) -> body bytes sent, for the requests of `path`."""
        out: dict[str | None, int] = defaultdict(int)
        for p, rng, n in self.sent():
            if p == path:
                out[rng] += n
        return dict(out)

    def clear_log(self) -> None:
        self.log.unlink(missing_ok=True)


def _serve(argv: list[str]) -> None:
    from stctl.serve import RepositoryHandler, make_server

    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("port", type=int)
    parser.add_argument("log")
    parser.add_argument("--die-after", type=int)
    parser.add_argument("--cut-path")
    parser.add_argument("--cut-after", type=int, default=0)
    parser.add_argument("--cuts", type=int, default=0)
    parser.add_argument("--status-path")
    parser.add_argument("--status", type=int, default=503)
    parser.add_argument("--statuses", type=int, default=0)
    args = parser.parse_args(argv)
    log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    state = {"blob_bytes": 0, "cuts_left": args.cuts, "statuses_left": args.statuses}

    class Faulty(RepositoryHandler):
        def send_head(self):
            if self.path == args.status_path and state["statuses_left"] > 0:
                state["statuses_left"] -= 1
                os.write(log_fd, f"{self.path}\t-\t{args.status}\t0\n".encode())
                self.send_error(args.status)
                return None
            return super().send_head()

        def copyfile(self, source, outputfile):
            cut = self.path == args.cut_path and state["cuts_left"] > 0
            if cut:
                state["cuts_left"] -= 1
            remaining, sent = self._remaining, 0
            while remaining > 0:
                n = min(remaining, 1 << 16)
                if cut:
                    n = min(n, args.cut_after - sent)
                dying = args.die_after is not None and self.path.startswith(BLOBS)
                if dying:
                    n = min(n, args.die_after - state["blob_bytes"])
                chunk = source.read(n) if n > 0 else b""
                if chunk:
                    outputfile.write(chunk)
                    os.write(log_fd, f"{self.path}\t{self.headers.get('Range') or '-'}\tbody\t{len(chunk)}\n".encode())
                    sent += len(chunk)
                    remaining -= len(chunk)
                    if self.path.startswith(BLOBS):
                        state["blob_bytes"] += len(chunk)
                if dying and state["blob_bytes"] >= args.die_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                if cut and sent >= args.cut_after:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if not chunk:
                    return

    make_server(args.directory, "127.0.0.1", args.port, handler=Faulty).serve_forever()


if __name__ == "__main__":
    _serve(sys.argv[1:])
