"""The device's command line and `stctl device`: every command documents an example; enrollment
writes a private file and registers the device; `st-agent init`, `status`, `health` and
`bundle install` run the library and turn its errors into one line and exit code 1."""
from __future__ import annotations

import json
import stat

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from agent.cli import app as agent_app
from agent.telemetry import Telemetry
from manifests.enrollment import Enrollment
from manifests.release import package_files
from stctl.bundle import export_bundle
from stctl.cli import app as stctl_app
from stctl.enroll import list_devices
from model.package import read_manifest
from stctl.pki import create_pki

pytest_plugins = ["release_fixtures", "agent_fixtures"]

runner = CliRunner()


def walk(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, path + (name,))


@pytest.mark.parametrize("app,prefix", [(agent_app, ()), (stctl_app, ("device", "enroll"))])
def test_every_command_and_group_has_help_with_an_example(app, prefix):
    for path, command in walk(get_command(app)):
        if path[:len(prefix)] != prefix[:len(path)]:
            continue
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Example:" in result.output, path


def test_enroll_writes_a_private_file_and_registers_the_device(fleet, tmp_path):
    out = tmp_path / "pc2.enroll"
    ws = ["--workspace", str(fleet.workspace.root)]
    result = runner.invoke(stctl_app, ["device", "enroll", "pc2", "--url", "https://10.0.4.17:8443", "--tag", "line=7",
                                       "--repository-url", fleet.repository_url, "-o", str(out), "--json", *ws])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    enrollment = Enrollment.from_bytes(out.read_bytes())
    assert (enrollment.name, enrollment.tags, enrollment.repository_url) == ("pc2", {"line": "7"}, fleet.repository_url)
    assert {d["name"]: d["tags"] for d in list_devices(fleet.workspace)}["pc2"] == {"line": "7"}  # in fleet.db
    for args in (["pc2", "--url", "https://10.0.4.17:8443"],  # enrolled already
                 ["pc3", "--url", "http://10.0.4.17:8443"],  # not https
                 ["pc3", "--url", "https://10.0.4.17:8443", "--tag", "no-equals"],
                 ["../pc3", "--url", "https://10.0.4.17:8443"]):
        result = runner.invoke(stctl_app, ["device", "enroll", *args, "--repository-url", fleet.repository_url,
                                           "-o", str(tmp_path / "x.enroll"), *ws])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and "error:" in result.output, args
    assert not (tmp_path / "x.enroll").exists()


def test_an_enrollment_naming_a_fleet_server_sets_up_call_home(fleet, tmp_path):
    from agent.config import load_config

    out = tmp_path / "pc5.enroll"
    result = runner.invoke(stctl_app, ["device", "enroll", "pc5", "--url", "https://10.0.4.17:8443", "--repository-url",
                                       fleet.repository_url, "--server-url", "https://fleet.plant.lan:8444", "-o",
                                       str(out), "--workspace", str(fleet.workspace.root)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(agent_app, ["init", "--enroll", str(out), "--data-dir", str(tmp_path / "d"),
                                       "--call-home-poll-s", "5"])
    assert result.exit_code == 0, result.output
    call_home = load_config(tmp_path / "d").call_home
    assert (call_home.server_url, call_home.poll_s) == ("https://fleet.plant.lan:8444", 5.0)
    # the enrollment of a push device sets up none; --call-home-server names one anyway
    result = runner.invoke(agent_app, ["init", "--enroll", str(fleet.enrollment), "--data-dir", str(tmp_path / "p")])
    assert result.exit_code == 0 and load_config(tmp_path / "p").call_home is None


def test_init_refuses_bad_enrollments_in_one_line(fleet, tmp_path):
    garbage = tmp_path / "garbage.enroll"
    garbage.write_bytes(b"\x00not json")
    other_ca = tmp_path / "other-ca.enroll"
    create_pki(tmp_path / "other", None, "other")
    d = json.loads(fleet.enrollment.read_text())
    other_ca.write_text(json.dumps({**d, "ca_cert_pem": (tmp_path / "other" / "ca.crt").read_text()}))
    for path, message in ((garbage, "not valid JSON"), (other_ca, "not signed by the enclosed fleet CA"),
                          (tmp_path / "missing.enroll", "no such enrollment file")):
        result = runner.invoke(agent_app, ["init", "--enroll", str(path), "--data-dir", str(tmp_path / "d")])
        assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "d" / "agent.json").exists()
    result = runner.invoke(agent_app, ["status", "--data-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "not an agent data dir" in result.output


@pytest.mark.slow
def test_status_health_and_a_tampered_active_shard(device_dir):
    status = json.loads(runner.invoke(agent_app, ["status", "--data-dir", str(device_dir), "--json"]).output)
    assert status["active"] == {"model": "st-demo", "version": "1.0.0"} and status["update"] is None
    result = runner.invoke(agent_app, ["health", "--data-dir", str(device_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    release = device_dir / "releases" / "st-demo" / "1.0.0"
    files = package_files(read_manifest(release))  # every shard and the tokenizer file
    assert report["passed"] and report["files_checked"] == len(files) and report["decode_tokens_per_s"] > 0
    heldout = read_manifest(release).health.heldout  # re-measured on the device, within its tolerance
    assert abs(report["heldout_loss"] - heldout["loss"]) <= heldout["tolerance"]
    shard = sorted((release / "shards").iterdir())[0]
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    result = runner.invoke(agent_app, ["health", "--data-dir", str(device_dir)])
    assert result.exit_code == 1 and "FAILED" in result.output and "sha256 mismatch" in result.output
    t = Telemetry(device_dir / "telemetry.db", 100)
    assert [row["passed"] for row in t.query("health_checks")][-2:] == [1, 0]
    t.close()


@pytest.mark.slow
def test_bundle_install_goes_through_verify_stage_health_activate(fleet, device_dir, tmp_path):
    export_bundle(fleet.workspace, "st-demo", "2.0.0", tmp_path / "v2.bundle", from_version="1.0.0")
    result = runner.invoke(agent_app, ["bundle", "install", str(tmp_path / "v2.bundle"), "--data-dir", str(device_dir),
                                       "--json"])
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["state"] == "active" and job["shards_downloaded"] == 32 and job["source"] == "bundle"
    assert job["history"] == ["idle", "fetching", "verifying", "staged", "health-checking", "activating", "active"]
    status = json.loads(runner.invoke(agent_app, ["status", "--data-dir", str(device_dir), "--json"]).output)
    assert status["active"]["version"] == "2.0.0" and status["previous"]["version"] == "1.0.0"
    (tmp_path / "junk.bundle").write_bytes(b"junk")
    result = runner.invoke(agent_app, ["bundle", "install", str(tmp_path / "junk.bundle"), "--data-dir", str(device_dir)])
    assert result.exit_code == 1 and "failed" in result.output
