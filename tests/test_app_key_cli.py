"""`stctl device app-key create|list|revoke` against two real `st-agent serve` processes on
127.0.0.1 (st-demo 1.0.0 active, application keys required) and one enrolled device where nothing
listens: the key printed once works for completions on the device it was made for and nowhere
else; `list` shows the device's keys beside fleet.db's record and flags the ones on one side only;
no key (and no full digest) is in fleet.db or in the output of `list`; a revoked key gets 401;
every refusal (revoke twice, a bad name, a name taken, an unknown or unreachable device) is one
line on stderr with exit 1 and changes nothing on any device or in fleet.db."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent_helpers import PROMPT, Agent, running_agents
from cli_helpers import assert_one_error_line
from manifests.app_keys import is_key, key_digest
from stctl.cli import app
from stctl.device_client import DeviceClient, DeviceError
from stctl.enroll import enroll_device
from stctl.fleetdb import open_fleet_db
from stctl.registry import enrolled

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow

DEVICES = {"d1": ["line=4", "ring=canary"], "d2": ["line=4", "ring=main"]}
UNREACHABLE = "gone"  # enrolled at a port where nothing listens


class KeyedFleet:
    def __init__(self, ws, agents: dict[str, Agent]):
        self.ws, self.agents = ws, agents

    def stctl(self, *args: str):
        return CliRunner().invoke(app, ["device", "app-key", *args, "--workspace", str(self.ws.root)],
                                  env={"COLUMNS": "200"})

    def completion_status(self, device: str, key: str | None) -> int:
        agent = self.agents[device]
        with agent.client(app_key=key) as client:
            return client.post(agent.url("/v1/completions"), json={"prompt": PROMPT, "max_tokens": 2},
                               timeout=60).status_code

    def device_keys(self, device: str) -> set[str]:
        return {k["name"] for k in self.agents[device].get("/v1/app-keys").json()["keys"]}

    def records(self, name: str) -> list[dict]:
        db = open_fleet_db(self.ws.fleet_db)
        try:
            return list(db["app_keys"].rows_where("name = ?", [name], order_by="id"))
        finally:
            db.close()

    def fleet_db_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.ws.root.glob("fleet.db*"))


@pytest.fixture(scope="module")
def keyed(published_template, v1_template, tmp_path_factory):
    """d1 and d2 (line=4) as real agents with st-demo 1.0.0 active; `gone` (line=9) enrolled only."""
    root = tmp_path_factory.mktemp("app-key-fleet")
    with running_agents(published_template, v1_template, root, DEVICES) as (ws, url, agents):
        enroll_device(ws, UNREACHABLE, "https://127.0.0.1:9", root / "gone.enroll", url, ["line=9"])
        yield KeyedFleet(ws, agents)


def create(keyed: KeyedFleet, *args: str) -> str:
    out = keyed.stctl("create", *args)
    assert out.exit_code == 0, out.output
    key = out.stdout.strip()
    assert is_key(key) and out.stdout == key + "\n", out.stdout  # the key alone on stdout
    assert "cannot be shown again" in out.stderr and key not in out.stderr
    return key


# ---- create, list, revoke ------------------------------------------------------------------------
def test_a_key_works_on_its_device_only_is_listed_without_its_secret_and_revoked(keyed):
    key = create(keyed, "d1", "line4-hmi")
    assert keyed.completion_status("d1", key) == 200
    assert keyed.completion_status("d2", key) == 401  # made for d1, not for the fleet
    [record] = keyed.records("line4-hmi")
    assert (record["device"], record["digest_prefix"], record["revoked_at"]) == ("d1", key_digest(key)[:8], None)
    assert key.encode() not in keyed.fleet_db_bytes() and key_digest(key).encode() not in keyed.fleet_db_bytes()

    # the library's client sends the key as the bearer token
    [d1] = enrolled(keyed.ws, ["d1"])
    client = DeviceClient.for_device(keyed.ws, d1)
    try:
        assert client.complete(PROMPT, max_tokens=2, app_key=key)["choices"][0]["text"] is not None
        with pytest.raises(DeviceError) as refused:
            client.complete(PROMPT, max_tokens=2)
        assert refused.value.status_code == 401
    finally:
        client.close()

    listed = keyed.stctl("list", "d1", "--json")
    assert listed.exit_code == 0, listed.output
    answer = json.loads(listed.stdout)
    keys = {k["name"]: k for k in answer["keys"]}
    assert answer["device"] == "d1" and answer["required"] is True
    assert keys["line4-hmi"]["status"] == "ok" and keys["line4-hmi"]["digest_prefix"] == key_digest(key)[:8]
    assert keys["line4-hmi"]["device_created"] and keys["line4-hmi"]["recorded_created"] == record["created_at"]
    assert keys["tests"]["status"] == "device_only"  # put on the device by the test harness, not by stctl
    table = keyed.stctl("list", "d1")
    assert table.exit_code == 0 and "line4-hmi" in table.stdout and "on the device, not in fleet.db" in table.stdout
    for shown in (listed.output, table.output):
        assert key not in shown and key_digest(key) not in shown

    revoked = keyed.stctl("revoke", "d1", "line4-hmi")
    assert revoked.exit_code == 0, revoked.output
    assert keyed.completion_status("d1", key) == 401
    assert keyed.records("line4-hmi")[0]["revoked_at"] is not None
    assert "line4-hmi" not in keyed.stctl("list", "d1").stdout
    assert_one_error_line(keyed.stctl("revoke", "d1", "line4-hmi"), "d1 has no application key named 'line4-hmi'")


def test_a_key_gone_from_the_device_is_flagged_and_its_record_closed_by_revoke(keyed):
    key = create(keyed, "d2", "scanner")
    assert keyed.agents["d2"].session.delete(keyed.agents["d2"].url("/v1/app-keys/scanner"), timeout=30).ok  # by hand
    keys = {k["name"]: k for k in json.loads(keyed.stctl("list", "d2", "--json").stdout)["keys"]}
    assert keys["scanner"]["status"] == "recorded_only" and keys["scanner"]["device_created"] is None
    assert "in fleet.db, gone from the device" in keyed.stctl("list", "d2").stdout
    assert keyed.completion_status("d2", key) == 401

    assert_one_error_line(keyed.stctl("revoke", "d2", "scanner"), "d2 has no application key named 'scanner'")
    assert keyed.records("scanner")[0]["revoked_at"] is not None  # the record no longer calls it valid
    assert "scanner" not in {k["name"] for k in json.loads(keyed.stctl("list", "d2", "--json").stdout)["keys"]}
    again = create(keyed, "d2", "scanner")  # the name is free again: a new key, a new record
    assert again != key and keyed.completion_status("d2", again) == 200
    assert [r["revoked_at"] is None for r in keyed.records("scanner")] == [False, True]


def test_one_key_on_every_device_a_tag_selects(keyed):
    out = keyed.stctl("create", "--tag", "line=4", "shared", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["devices"] == ["d1", "d2"] and result["name"] == "shared" and is_key(result["key"])
    assert all(keyed.completion_status(d, result["key"]) == 200 for d in ("d1", "d2"))
    assert sorted(r["device"] for r in keyed.records("shared")) == ["d1", "d2"]

    revoked = keyed.stctl("revoke", "--tag", "line=4", "shared", "--json")
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.stdout)["devices"] == ["d1", "d2"]
    assert all(keyed.completion_status(d, result["key"]) == 401 for d in ("d1", "d2"))
    assert all(r["revoked_at"] for r in keyed.records("shared"))
    assert_one_error_line(keyed.stctl("create", "--tag", "line=7", "nobody"), "no enrolled device has the tags line=7")


# ---- refusals: one line, nothing changes ----------------------------------------------------------
def test_a_name_taken_on_one_device_refuses_the_whole_create(keyed):
    create(keyed, "d2", "taken")
    assert_one_error_line(keyed.stctl("create", "d1", "d2", "taken"),
                          "d2 already has an application key named 'taken'", "no key was created")
    assert "taken" not in keyed.device_keys("d1")
    assert [r["device"] for r in keyed.records("taken")] == ["d2"]


@pytest.mark.parametrize("args, mentions", [
    (("d1", "Bad\n"), ["app key name 'Bad\\n'"]),
    (("d1", "Upper"), ["app key name 'Upper'"]),
    (("nosuch", "k1"), ["no enrolled device named 'nosuch'"]),
    (("k1",), ["name at least one device, or select devices with --tag"]),
    (("--tag", "line", "k1"), ["tag 'line': expected KEY=VALUE"]),
])
def test_bad_input_is_one_line_and_contacts_no_device(keyed, args, mentions):
    before = {name: keyed.device_keys(name) for name in DEVICES}
    assert_one_error_line(keyed.stctl("create", *args), *mentions)
    assert {name: keyed.device_keys(name) for name in DEVICES} == before
    assert keyed.records("k1") == [] and keyed.records("Bad\n") == []


def test_an_unreachable_device_is_named_in_one_line(keyed):
    for args in (("create", UNREACHABLE, "k2"), ("list", UNREACHABLE), ("revoke", UNREACHABLE, "k2")):
        assert_one_error_line(keyed.stctl(*args), f"{UNREACHABLE}: unreachable at https://127.0.0.1:9")
    # with a reachable device beside it, neither gets the key
    assert_one_error_line(keyed.stctl("create", "d1", UNREACHABLE, "k2"), f"{UNREACHABLE}: unreachable",
                          "no key was created")
    assert "k2" not in keyed.device_keys("d1") and keyed.records("k2") == []
