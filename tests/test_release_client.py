"""The device's update client against a real repository served on 127.0.0.1: delta updates,
resumed downloads, any static server, offline bundles, key rotation, one updater per folder."""
from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

from agent.errors import DownloadError, TransportError, UpdaterBusyError, VerificationError
from agent.fetcher import FetcherConfig
from agent.tuf_client import metadata_lock, verify_bundle
from manifests.release import blob_target, package_files
from model.package import read_manifest, verify_package
from stctl.bundle import export_bundle
from stctl.delta import diff_manifests
from stctl import repository as repository_module
from stctl.repository import Repository, stored_target_path
from stctl.serve import RepositoryHandler
from release_helpers import Device, blobs_of, serve

pytest_plugins = ["release_fixtures"]  # session fixtures: demo packages, published workspace


def test_update_to_variant_2_downloads_only_the_changed_shards(workspace, demo_packages, tmp_path):
    device = Device(tmp_path / "device", workspace)
    delta = diff_manifests(read_manifest(demo_packages[0]), read_manifest(demo_packages[1]))
    with serve(workspace.repository) as url:
        first = device.client(url).fetch_release("st-demo", "1.0.0")
        assert first.shards_downloaded == blobs_of(demo_packages[0]) and first.bytes_downloaded >= first.bytes_total
        second = device.client(url).fetch_release("st-demo", "2.0.0")
        again = device.client(url).fetch_release("st-demo", "2.0.0")
    assert second.shards_downloaded == len(delta.changed_shards) == 32
    assert second.bytes_downloaded <= 1.05 * delta.bytes_to_ship + second.metadata_bytes
    assert second.bytes_downloaded - second.metadata_bytes >= delta.bytes_to_ship
    assert again.shards_downloaded == 0  # already up to date is a normal outcome
    package = device.store.materialize(second.manifest_bytes, tmp_path / "device" / "packages" / "st-demo-2.0.0")
    assert verify_package(tmp_path / "device" / "packages" / "st-demo-2.0.0") == package
    assert device.nothing_unverified()


class CutOnce(RepositoryHandler):
    """Drops the connection half-way through the first plain GET of `cut_path`; logs what it sent."""

    cut_path = ""
    cut_at = 0
    sent: list[tuple[str | None, int]] = []

    def copyfile(self, source, outputfile):
        if self.path == self.cut_path:
            if "Range" not in self.headers and not CutOnce.sent:
                outputfile.write(source.read(self.cut_at))
                outputfile.flush()
                CutOnce.sent.append((None, self.cut_at))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            CutOnce.sent.append((self.headers.get("Range"), self._remaining))
        super().copyfile(source, outputfile)


def test_interrupted_download_resumes_where_it_stopped(workspace, demo_packages, tmp_path):
    manifest = read_manifest(demo_packages[0])
    order = list(dict.fromkeys(sha256 for _, sha256, _ in package_files(manifest)))  # the order they download in
    biggest = max(manifest.shards[len(manifest.shards) // 2:], key=lambda s: s.size)  # with many before it
    CutOnce.cut_path = "/targets/" + stored_target_path(blob_target(biggest.sha256), biggest.sha256)
    CutOnce.cut_at = biggest.size // 2
    CutOnce.sent = []
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository, CutOnce) as url:
        with pytest.raises(TransportError, match="interrupted"):  # no retry window: the fetch fails at the cut
            device.client(url, fetcher=FetcherConfig(retry_window_s=0)).fetch_release("st-demo", "1.0.0")
        partials = list(device.store.partial_dir.iterdir())
        assert [p.stat().st_size for p in partials] == [CutOnce.cut_at]
        assert device.store.installed() == set()
        release = device.client(url).fetch_release("st-demo", "1.0.0")
    assert CutOnce.sent == [(None, CutOnce.cut_at), (f"bytes={CutOnce.cut_at}-", biggest.size - CutOnce.cut_at)]
    assert sum(n for _, n in CutOnce.sent) == biggest.size  # no byte of the shard sent twice
    # the shards verified before the cut were kept: the second fetch took the cut one and those after it
    assert release.shards_downloaded == len(order) - order.index(biggest.sha256)
    assert device.store.installed() >= {s.sha256 for s in manifest.shards}
    assert device.nothing_unverified()


def test_python_http_server_serves_the_repository_as_is(workspace, demo_packages, tmp_path):
    """The README's example: any static server works; `python -m http.server` has no Range."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(workspace.repository)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/metadata/timestamp.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        release = Device(tmp_path / "device", workspace).client(url).fetch_release("st-demo", "2.0.0")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert release.shards_downloaded == blobs_of(demo_packages[1]) and release.manifest.version == "2.0.0"


def test_bundle_verifies_offline_and_carries_only_what_the_site_lacks(workspace, demo_packages, tmp_path):
    full = export_bundle(workspace, "st-demo", "1.0.0", tmp_path / "v1.bundle")
    delta = export_bundle(workspace, "st-demo", "2.0.0", tmp_path / "v2.bundle", from_version="1.0.0")
    changed = diff_manifests(read_manifest(demo_packages[0]), read_manifest(demo_packages[1]))
    assert delta["blobs"] == 32 and delta["bytes"] == changed.bytes_to_ship
    assert delta["bundle_bytes"] < 1.1 * changed.bytes_to_ship + 200_000 < full["bundle_bytes"]
    device = Device(tmp_path / "device", workspace)
    bundle_metadata = tmp_path / "device" / "tuf-bundle"
    first = verify_bundle(tmp_path / "v1.bundle", device.trusted_root, bundle_metadata, device.store)
    assert first.shards_downloaded == blobs_of(demo_packages[0])
    release = verify_bundle(tmp_path / "v2.bundle", device.trusted_root, bundle_metadata, device.store)
    assert release.shards_downloaded == 32 and release.manifest.version == "2.0.0"
    with pytest.raises(VerificationError, match="BadVersionNumber"):  # an older bundle never replays
        verify_bundle(tmp_path / "v1.bundle", device.trusted_root, bundle_metadata, device.store)


def test_delta_bundle_on_a_device_without_the_base_version_installs_nothing(workspace, tmp_path):
    export_bundle(workspace, "st-demo", "2.0.0", tmp_path / "v2.bundle", from_version="1.0.0")
    device = Device(tmp_path / "device", workspace)
    with pytest.raises(DownloadError, match="not in the bundle"):
        verify_bundle(tmp_path / "v2.bundle", device.trusted_root, tmp_path / "device" / "tuf-bundle", device.store)
    assert device.store.installed() == set() and device.nothing_unverified()


def test_clients_follow_key_rotations_of_every_role(workspace, tmp_path):
    repo = Repository(workspace)
    for role in ("timestamp", "snapshot", "targets", "root"):
        repo.rotate(role)
    assert repo.state().root.signed.version == 5
    device = Device(tmp_path / "device", workspace)  # still trusts root version 1
    with serve(workspace.repository) as url:
        release = device.client(url).fetch_release("st-demo", "2.0.0")
    assert release.manifest.version == "2.0.0"
    assert (tmp_path / "device" / "tuf" / "root_history" / "5.root.json").exists()


def test_two_updaters_never_share_a_metadata_folder(workspace, tmp_path):
    device = Device(tmp_path / "device", workspace)
    with metadata_lock(tmp_path / "device" / "tuf"):
        with pytest.raises(UpdaterBusyError):
            device.client("http://127.0.0.1:9").fetch_release("st-demo", "1.0.0")


def test_rotation_killed_half_way_is_repaired_by_refresh(workspace, tmp_path, monkeypatch):
    repo = Repository(workspace)
    real_write = repository_module.atomic_write

    def killed_after_root(path, data, mode=0o644):
        if path.name.endswith(".targets.json"):
            raise KeyboardInterrupt("killed")
        real_write(path, data, mode)

    monkeypatch.setattr(repository_module, "atomic_write", killed_after_root)
    with pytest.raises(KeyboardInterrupt):
        repo.rotate("targets")
    monkeypatch.undo()
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository) as url:
        with pytest.raises(VerificationError, match="UnsignedMetadata"):  # root v2 distrusts the old targets key
            device.client(url).fetch_release("st-demo", "2.0.0")
        assert repo.refresh()["resigned"] == ["timestamp", "snapshot", "targets"]
        assert device.client(url).fetch_release("st-demo", "2.0.0").manifest.version == "2.0.0"


def test_a_client_hanging_up_mid_download_is_not_a_server_error(workspace, capfd):
    """A device that loses power mid-download resets its connection: routine, so no traceback."""
    blob = max((p for p in workspace.repository.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    path = "/" + blob.relative_to(workspace.repository).as_posix()
    with serve(workspace.repository) as url:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.recv(1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close -> RST
        with urllib.request.urlopen(url + "/metadata/timestamp.json", timeout=5) as r:
            assert r.status == 200  # the server still serves
    assert "Traceback" not in capfd.readouterr().err
