"""One test per attack on the update channel, each against a real repository on 127.0.0.1.

The attacker controls the server (or the mirror between it and the device) and, in the last
test, an old signing key. Every attack must end in an UpdateError and leave nothing installed:
the device's blob store holds exactly what it held before, with no unverified bytes left over.
"""
from __future__ import annotations

import io
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from agent.errors import DownloadError, ReleaseNotFoundError, UpdateError, VerificationError
from manifests import ModelManifest
from manifests.release import manifest_target
from stctl.repository import Repository, sign_next, stored_target_path
from stctl.serve import RepositoryHandler
from common.files import atomic_write
from stctl.workspace import Expiry
from release_helpers import Device, serve

pytest_plugins = ["release_fixtures"]  # session fixtures: demo packages, published workspace


def assert_refused(device: Device, url: str, version: str, error: type[UpdateError], match: str) -> None:
    before = device.store.installed()
    with pytest.raises(error, match=match):
        device.client(url).fetch_release("st-demo", version)
    assert device.store.installed() == before
    assert device.nothing_unverified()


def _v2_manifest(ws) -> ModelManifest:
    return ModelManifest.from_bytes(Repository(ws).manifest_bytes("st-demo", "2.0.0"))


def _v1_hashes(ws) -> set[str]:
    return {s.sha256 for s in ModelManifest.from_bytes(Repository(ws).manifest_bytes("st-demo", "1.0.0")).shards}


def test_tampered_shard(workspace, tmp_path):
    """A shard new in 2.0.0 is replaced on the server by bytes of the same length."""
    shard = next(s for s in _v2_manifest(workspace).shards if s.sha256 not in _v1_hashes(workspace))
    path = Repository(workspace).target_file("blobs/" + shard.sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository) as url:
        assert_refused(device, url, "2.0.0", VerificationError, "LengthOrHashMismatch")
    assert device.store.installed() == set()


def test_tampered_manifest(workspace, tmp_path):
    """The 2.0.0 manifest on the server points one shard at the attacker's blob."""
    path = Repository(workspace).target_file(manifest_target("st-demo", "2.0.0"))
    manifest = _v2_manifest(workspace)
    evil = path.read_bytes().replace(manifest.shards[0].sha256.encode(), b"e" * 64)
    path.write_bytes(evil)
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository) as url:
        assert_refused(device, url, "2.0.0", VerificationError, "LengthOrHashMismatch")


def test_metadata_rollback(workspace, tmp_path):
    """After the device saw timestamp N+1, the server replays the older (validly signed) timestamp N."""
    old_timestamp = (workspace.metadata_dir / "timestamp.json").read_bytes()
    Repository(workspace).refresh()
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository) as url:
        with pytest.raises(ReleaseNotFoundError):  # any fetch makes the device trust the newest metadata
            device.client(url).fetch_release("st-demo", "9.9.9")
        (workspace.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
        assert_refused(device, url, "2.0.0", VerificationError, "BadVersionNumber")


def test_freeze_expired_timestamp(workspace, tmp_path):
    """The server keeps serving a timestamp past its expiry (here: one that expired a minute ago)."""
    repo = Repository(workspace)
    state = repo.state()
    stale = Expiry(timestamp=timedelta(minutes=-1))
    for name, data in sign_next(state, repo.signers(["timestamp"], state), targets_changed=False,
                                snapshot_changed=False, expiry=stale):
        atomic_write(workspace.metadata_dir / name, data)
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository) as url:
        assert_refused(device, url, "2.0.0", VerificationError, "ExpiredMetadata")


def test_mix_and_match_snapshot_of_another_release(workspace, tmp_path):
    """The server answers the current snapshot's name with the snapshot of the 1.0.0 release."""
    current = Repository(workspace).state().snapshot.signed.version
    older = (workspace.metadata_dir / f"{current - 1}.snapshot.json").read_bytes()
    (workspace.metadata_dir / f"{current}.snapshot.json").write_bytes(older)
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository) as url:
        assert_refused(device, url, "2.0.0", VerificationError, "LengthOrHashMismatch")


class Endless(RepositoryHandler):
    """Answers `target` with a body that never ends (no Content-Length), up to 100 MB."""

    target = ""
    offered = 100 * 2**20

    def send_head(self):
        if self.path != Endless.target:
            return super().send_head()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        return io.BytesIO()

    def copyfile(self, source, outputfile):
        if self.path != Endless.target:
            return super().copyfile(source, outputfile)
        block = b"\0" * 2**16
        try:
            for _ in range(Endless.offered // len(block)):
                outputfile.write(block)
        except OSError:
            pass  # the device hung up, as it must


def test_endless_data(workspace, tmp_path):
    """The server sends far more bytes than the signed length of the 2.0.0 manifest."""
    repo = Repository(workspace)
    target = manifest_target("st-demo", "2.0.0")
    Endless.target = "/" + str(repo.target_file(target).relative_to(workspace.repository))
    received = []
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository, Endless) as url:
        client = device.client(url, progress=lambda done, total, label: received.append(done))
        before = device.store.installed()
        with pytest.raises(DownloadError, match="DownloadLengthMismatch"):
            client.fetch_release("st-demo", "2.0.0")
    assert device.store.installed() == before and device.nothing_unverified()
    signed_length = repo.state().targets.signed.targets[target].length
    assert max(received) < signed_length + 2**20 < Endless.offered  # capped at the signed length (+ one read)


def test_revoked_key_after_rotation(workspace, tmp_path):
    """The targets key is rotated; the attacker still holds the old one and signs a new release
    with it (with valid snapshot and timestamp signatures, the worst case)."""
    repo = Repository(workspace)
    old_key = CryptoSigner(load_pem_private_key(next(workspace.keys_dir.glob("targets-*.pem")).read_bytes(), None))
    repo.rotate("targets")
    state = repo.state()
    evil_manifest = replace(_v2_manifest(workspace), version="6.6.6").to_bytes()
    target = manifest_target("st-demo", "6.6.6")
    info = TargetFile.from_data(target, evil_manifest)
    atomic_write(workspace.targets_dir / stored_target_path(target, info.hashes["sha256"]), evil_manifest)
    state.targets.signed.targets[target] = info
    signers = repo.signers(["snapshot", "timestamp"], state) | {"targets": [old_key]}
    repo.commit(state, signers, targets_changed=True)
    device = Device(tmp_path / "device", workspace)
    with serve(workspace.repository) as url:
        assert_refused(device, url, "6.6.6", VerificationError, "UnsignedMetadata")
