"""`stctl health`: run the health check of the active release on devices, and report it.

Rules: every named device (or all) is asked at once, at most `concurrency` in flight, each bounded
by the client's health timeout; an unreachable device is a failed result, never an exception of
the whole command; the devices' new `health_checks` rows are pulled into `fleet.db` (so
`stctl device list` shows the last result) and what each device said is recorded in the registry.
"""
from __future__ import annotations

from stctl.device_client import ClientConfig, DeviceClient, DeviceError, map_devices, release_of
from stctl.fleetdb import open_fleet_db
from stctl.registry import enrolled, record_status
from stctl.telemetry_pull import pull_device
from stctl.workspace import Workspace


def check_fleet(workspace: Workspace, names: list[str] | None = None, concurrency: int = 4,
                client_config: ClientConfig = ClientConfig()) -> list[dict]:
    """Health-check the named devices (all when `names` is empty); one result per device."""
    devices = enrolled(workspace, names)

    def check(device: dict) -> dict:
        client = DeviceClient.for_device(workspace, device, client_config)
        result = {"device": device["name"], "reachable": True, "model": None, "version": None, "passed": False,
                  "decode_tokens_per_s": None, "peak_rss_bytes": None, "rolled_back": False, "detail": ""}
        db = open_fleet_db(workspace.fleet_db)
        try:
            answer = client.health_check()
            result.update(model=answer.get("model"), version=answer.get("version"), passed=bool(answer.get("passed")),
                          decode_tokens_per_s=answer.get("decode_tokens_per_s"),
                          peak_rss_bytes=answer.get("peak_rss_bytes"), rolled_back=bool(answer.get("rolled_back")),
                          detail=answer.get("detail", ""))
            status = client.status()
            record_status(db, device["name"], status)
            if result["rolled_back"]:
                now = release_of(status)
                result["detail"] += f"; the device rolled back to {now[1] if now else 'nothing'}"
            pull_device(db, client, tables=("health_checks",))
        except DeviceError as e:
            result.update(reachable=not e.unreachable, detail=str(e))
            if e.unreachable:
                record_status(db, device["name"], None, str(e))
        finally:
            db.close()
            client.close()
        return result

    return map_devices(check, devices, concurrency)
