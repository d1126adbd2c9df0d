"""stctl init / publish / refresh / diff / CLI, against a real workspace on disk.

Bad input (missing package, corrupt shard, wrong passphrase, version already published) gets a
clear error and leaves the repository byte-for-byte unchanged.
"""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import stat
import threading

import pytest
from typer.testing import CliRunner

from stctl import repository as repository_module
from stctl.bootstrap import init_workspace
from stctl.cli import app
from stctl.errors import PublishError, SigningKeyError, WorkspaceError
from stctl.fleetdb import open_fleet_db
from manifests.enrollment import certificate_role as cert_role
from stctl.pki import issue_device_cert
from stctl.repository import Repository
from stctl.workspace import ENV_PASSPHRASE, open_workspace
from release_helpers import tree_hash

pytest_plugins = ["release_fixtures"]  # session fixtures: demo packages, published workspace

runner = CliRunner()


def test_init_creates_the_workspace_layout(tmp_path):
    ws = init_workspace(tmp_path / "fleet")
    for rel in ("stctl.toml", "fleet.db", "repository/metadata/1.root.json", "repository/metadata/timestamp.json",
                "repository/targets", "pki/ca.crt", "pki/operator.crt", "pki/operator.key"):
        assert (ws.root / rel).exists(), rel
    key_files = list(ws.keys_dir.glob("*.pem"))
    assert sorted(p.name.split("-")[0] for p in key_files) == ["root", "snapshot", "targets", "timestamp"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in key_files + [ws.pki_dir / "operator.key"])
    assert stat.S_IMODE(ws.keys_dir.stat().st_mode) == 0o700
    db = open_fleet_db(ws.fleet_db)
    assert "releases" in db.table_names() and db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert cert_role((ws.pki_dir / "operator.crt").read_bytes()) == "operator"
    assert not list(ws.root.glob(".stctl-init-*"))


def test_init_twice_refuses_and_keeps_the_keys(tmp_path):
    ws = init_workspace(tmp_path / "fleet")
    before = tree_hash(ws.root)
    with pytest.raises(WorkspaceError, match="refusing to overwrite"):
        init_workspace(ws.root)
    result = runner.invoke(app, ["init", str(ws.root)])
    assert result.exit_code == 1 and "refusing to overwrite" in result.output
    assert tree_hash(ws.root) == before


def test_device_certificate_serves_tls_to_an_operator_on_127_0_0_1(tmp_path):
    ws = init_workspace(tmp_path / "fleet")
    key_pem, cert_pem = issue_device_cert(ws, "press-7", ["127.0.0.1", "press-7.factory"])
    assert cert_role(cert_pem) == "device"
    (tmp_path / "dev.key").write_bytes(key_pem)
    (tmp_path / "dev.crt").write_bytes(cert_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "dev.crt", tmp_path / "dev.key")
    server_ctx.load_verify_locations(ws.pki_dir / "ca.crt")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(ws.pki_dir / "ca.crt"))
    client_ctx.load_cert_chain(ws.pki_dir / "operator.crt", ws.pki_dir / "operator.key")
    listener = socket.create_server(("127.0.0.1", 0))
    seen = {}

    def accept():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            seen["peer"] = tls.getpeercert()
            tls.sendall(b"ok")

    thread = threading.Thread(target=accept)
    thread.start()
    with socket.create_connection(listener.getsockname()) as raw, \
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.recv(2) == b"ok"
    thread.join(timeout=10)
    listener.close()
    assert ("URI", "urn:st:role:operator") in seen["peer"]["subjectAltName"]


def test_publish_records_content_addressed_targets(workspace, demo_packages):
    repo = Repository(workspace)
    releases = {(r.model, r.version) for r in repo.releases()}
    assert releases == {("st-demo", "1.0.0"), ("st-demo", "2.0.0")}
    targets = repo.state().targets.signed.targets
    v2 = open(demo_packages[1] / "manifest.json", "rb").read()
    assert targets["models/st-demo/2.0.0/manifest.json"].length == len(v2)
    for path, info in targets.items():
        assert repo.target_file(path).is_file()
        if path.startswith("blobs/"):
            assert path == "blobs/" + info.hashes["sha256"]
    rows = list(open_fleet_db(workspace.fleet_db)["releases"].rows)
    assert {(r["model"], r["version"]) for r in rows} == releases
    assert next(r for r in rows if r["version"] == "2.0.0")["bytes_new"] < rows[0]["bytes_full"] / 3


def test_publish_missing_package_leaves_the_repository_unchanged(workspace, tmp_path):
    before = tree_hash(workspace.repository)
    with pytest.raises(PublishError, match="no such package"):
        Repository(workspace).publish(tmp_path / "nope")
    result = runner.invoke(app, ["model", "publish", str(tmp_path / "nope"), "-w", str(workspace.root)])
    assert result.exit_code == 1 and "no such package" in result.output
    assert tree_hash(workspace.repository) == before


def test_publish_corrupt_shard_leaves_the_repository_unchanged(workspace, demo_v3, tmp_path):
    package = tmp_path / "v3"
    shutil.copytree(demo_v3, package)
    shard = sorted((package / "shards").glob("layer.1.expert.*"))[-1]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    before = tree_hash(workspace.repository)
    result = runner.invoke(app, ["model", "publish", str(package), "-w", str(workspace.root), "--json"])
    assert result.exit_code == 1 and "corrupt or tampered shard" in result.output
    assert tree_hash(workspace.repository) == before
    assert not list(workspace.root.glob(".publish-*"))


def test_publish_version_already_published_leaves_the_repository_unchanged(workspace, demo_packages):
    before = tree_hash(workspace.repository)
    result = runner.invoke(app, ["model", "publish", str(demo_packages[1]), "-w", str(workspace.root)])
    assert result.exit_code == 1 and "st-demo@2.0.0 is already published" in result.output
    assert tree_hash(workspace.repository) == before


def test_publish_wrong_passphrase_leaves_the_repository_unchanged(tmp_path, demo_packages, monkeypatch):
    monkeypatch.setenv(ENV_PASSPHRASE, "correct horse")
    ws = init_workspace(tmp_path / "fleet")
    assert ws.config.keys_encrypted
    before = tree_hash(ws.repository)
    monkeypatch.setenv(ENV_PASSPHRASE, "wrong horse")
    with pytest.raises(SigningKeyError, match="wrong passphrase"):
        Repository(ws).publish(demo_packages[0])
    monkeypatch.delenv(ENV_PASSPHRASE)
    result = runner.invoke(app, ["model", "publish", str(demo_packages[0]), "-w", str(ws.root)])
    assert result.exit_code == 1 and ENV_PASSPHRASE in result.output
    assert tree_hash(ws.repository) == before


def test_publish_killed_before_the_timestamp_keeps_serving_the_previous_state(workspace, demo_v3, monkeypatch):
    package = demo_v3
    repo = Repository(workspace)
    before = repo.state()
    real_write = repository_module.atomic_write

    def killed_at_timestamp(path, data, mode=0o644):
        if path.name == "timestamp.json":
            raise KeyboardInterrupt("killed")
        real_write(path, data, mode)

    monkeypatch.setattr(repository_module, "atomic_write", killed_at_timestamp)
    with pytest.raises(KeyboardInterrupt):
        repo.publish(package)
    monkeypatch.undo()
    after = repo.state()
    assert after.timestamp.signed.version == before.timestamp.signed.version
    assert after.targets.signed.targets == before.targets.signed.targets
    report = repo.publish(package)  # the next publish overwrites the unreferenced files
    assert report.version == "3.0.0" and repo.state().targets.signed.version == before.targets.signed.version + 1


def test_refresh_resigns_the_timestamp(workspace):
    repo = Repository(workspace)
    before = repo.state()
    result = runner.invoke(app, ["repo", "refresh", "-w", str(workspace.root), "--json"])
    assert result.exit_code == 0, result.output
    after = repo.state()
    assert after.timestamp.signed.version == before.timestamp.signed.version + 1
    assert after.snapshot.signed.version == before.snapshot.signed.version


def test_model_diff_json_for_packages_and_published_releases(workspace, demo_packages):
    for old, new in ((str(demo_packages[0]), str(demo_packages[1])), ("st-demo@1.0.0", "st-demo@2.0.0")):
        result = runner.invoke(app, ["model", "diff", old, new, "-w", str(workspace.root), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert len(report["changed_shards"]) == 32 and all(".expert." in n for n in report["changed_shards"])
        assert report["bytes_full"] > 3 * report["bytes_to_ship"] > 0
    result = runner.invoke(app, ["model", "diff", "st-demo@1.0.0", "st-demo@9.0.0", "-w", str(workspace.root)])
    assert result.exit_code == 1 and "not published" in result.output


@pytest.mark.parametrize("command", [["init"], ["model", "publish"], ["model", "diff"], ["repo", "serve"],
                                     ["repo", "refresh"], ["keys", "rotate"], ["bundle", "export"]])
def test_every_release_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


def test_commands_outside_a_workspace_say_how_to_make_one(tmp_path):
    result = runner.invoke(app, ["repo", "refresh", "-w", str(tmp_path)])
    assert result.exit_code == 1 and "stctl init" in result.output


def test_init_json(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "new"), "--json"])
    assert result.exit_code == 0 and '"keys_encrypted": false' in result.output


def test_refresh_renews_root_and_targets_when_half_their_validity_is_gone(workspace):
    config = workspace.root / "stctl.toml"
    text = config.read_text().replace('root = "365d"', 'root = "1000d"')
    config.write_text(text.replace('targets = "90d"', 'targets = "300d"'))
    repo = Repository(open_workspace(workspace.root))
    before = repo.state()
    assert repo.refresh()["resigned"] == ["root", "timestamp", "snapshot", "targets"]
    after = repo.state()
    assert after.root.signed.version == before.root.signed.version + 1
    assert after.targets.signed.targets == before.targets.signed.targets
    assert after.targets.signed.expires > before.targets.signed.expires


def test_keys_rotate_and_bundle_export_from_the_cli(workspace, tmp_path):
    ws = ["-w", str(workspace.root), "--json"]
    result = runner.invoke(app, ["keys", "rotate", "timestamp", *ws])
    assert result.exit_code == 0, result.output
    revoked = json.loads(result.output)["revoked"][0]
    assert not list(workspace.keys_dir.glob(f"timestamp-{revoked[:16]}.pem"))
    out = tmp_path / "v2.bundle"
    result = runner.invoke(app, ["bundle", "export", "--model", "st-demo", "--version", "2.0.0",
                                 "--from-version", "1.0.0", "-o", str(out), *ws])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["blobs"] == 32 and out.is_file()
    result = runner.invoke(app, ["bundle", "export", "--model", "st-demo", "--version", "2.0.0", "-o", str(out), *ws])
    assert result.exit_code == 1 and "already exists" in result.output
