"""Helpers of the release tests: the embedded repository server in a thread, a device's data
folder with its update client, and a tree hash to prove "repository unchanged"."""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.blobstore import BlobStore
from agent.tuf_client import ClientConfig, ReleaseClient
from manifests.release import package_files
from model.package import read_manifest
from stctl.serve import RepositoryHandler, make_server
from stctl.workspace import Workspace


@contextmanager
def serve(directory: Path, handler: type[RepositoryHandler] = RepositoryHandler) -> Iterator[str]:
    """The embedded repository server on 127.0.0.1 in a thread; yields its base URL."""
    server = make_server(directory, "127.0.0.1", 0, handler=handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class Device:
    """A device's data folder: TUF metadata, blob store, and the enrollment root (version 1)."""

    def __init__(self, folder: Path, ws: Workspace):
        self.folder = folder
        self.store = BlobStore(folder / "store")
        self.trusted_root = (ws.metadata_dir / "1.root.json").read_bytes()

    def client(self, url: str, progress=None, **config) -> ReleaseClient:
        return ReleaseClient(self.folder / "tuf", url, self.trusted_root, self.store, progress, ClientConfig(**config))

    def nothing_unverified(self) -> bool:
        """No temp files or partial downloads left behind in the store."""
        return not any(self.store.tmp_dir.iterdir()) and not any(self.store.partial_dir.iterdir())


def blobs_of(package: Path) -> int:
    """How many files a device with an empty store fetches for `package` (besides its manifest):
    its shards and tokenizer file, one download per distinct sha256."""
    return len({sha256 for _, sha256, _ in package_files(read_manifest(package))})


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (directories as 'dir')."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out
