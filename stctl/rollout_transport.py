"""How the rollout controller reaches a device: one small interface (`DeviceTransport`), two ways.

- `PushDevice`: the device's HTTPS management API (`stctl.device_client.DeviceClient`), for a
  device enrolled without a fleet server;
- `stctl.rollout_call_home.CallHomeDevice`: fleet.db, for a device that calls home
  (`devices.server_url` set): the controller writes assignments and reads what the device
  reported; the fleet server carries both at the device's polls.

`transport_for` picks one per device, so a rollout may mix push and call-home devices.

Rules (both ways keep them, so `stctl.rollout` needs no branch on the kind of device):
- every failure is a `DeviceError` (`transient` when the device may answer later);
- `mark()` is an instant on the device's clock after every update row it has recorded (push) or
  reported (call home) so far; rows newer than it belong to this rollout's update;
- `adopt_job` finds the job a killed controller's request created, so a device is asked once;
  `request_update` asks for the update and returns the job's id; `update(job_id)` is the job as
  `{state, detail}` with the states of `manifests.job_states`;
- `health_check` is the device's verdict on the new release, `rollback` asks the device to go
  back to its previous release, `pull_telemetry` brings its rows into fleet.db (a no-op where
  they are there already).
"""
from __future__ import annotations

from typing import Protocol

import sqlite_utils

from stctl.device_client import ClientConfig, DeviceClient, DeviceError
from stctl.telemetry_pull import pull_device
from stctl.workspace import Workspace


class DeviceTransport(Protocol):
    name: str

    def status(self) -> dict: ...
    def mark(self, clock_margin_s: float) -> float: ...
    def adopt_job(self, model: str, version: str, mark: float) -> str | None: ...
    def request_update(self, model: str, version: str, repository_url: str | None,
                       allow_downgrade: bool) -> str: ...
    def update(self, job_id: str) -> dict: ...
    def health_check(self, model: str, version: str, since: float) -> dict: ...
    def rollback(self, model: str, version: str) -> None: ...
    def pull_telemetry(self, db: sqlite_utils.Database) -> None: ...
    def close(self) -> None: ...


class PushDevice:
    """A device the controller calls over its HTTPS API (DESIGN.md "Device HTTP API")."""

    def __init__(self, client: DeviceClient):
        self.client, self.name = client, client.name

    def close(self) -> None:
        self.client.close()

    def status(self) -> dict:
        return self.client.status()

    def mark(self, clock_margin_s: float) -> float:
        """The newest `updates` row of the last seconds, or the device's Date minus the margin."""
        client = self.client
        if client.last_date is None:
            raise DeviceError(client.name, "the device sends no Date header; its clock is needed to resume safely")
        base = client.last_date - clock_margin_s
        return max([base] + [float(r["ts"]) for r in client.telemetry("updates", base, 1000) if r.get("ts") is not None])

    def adopt_job(self, model: str, version: str, mark: float) -> str | None:
        """The device's unfinished job for this release, else one created after `mark` (found
        through its `updates` telemetry since `mark`)."""
        client = self.client
        update = client.status().get("update") or {}
        if update.get("model") == model and update.get("version") == version and update.get("id"):
            return update["id"]
        seen = set()
        for row in client.telemetry("updates", mark, 1000):
            job_id = row.get("job_id")
            if row.get("model") != model or row.get("to_version") != version or not job_id or job_id in seen:
                continue
            seen.add(job_id)
            try:
                job = client.update(job_id)
            except DeviceError as e:
                if e.status_code == 404:  # pruned: an old job, not one created since the mark
                    continue
                raise
            if float(job.get("created") or 0.0) > mark:  # created after the mark: ours
                return job_id
        return None

    def request_update(self, model: str, version: str, repository_url: str | None, allow_downgrade: bool) -> str:
        return self.client.request_update(model, version, repository_url, allow_downgrade)

    def update(self, job_id: str) -> dict:
        return self.client.update(job_id)

    def health_check(self, model: str, version: str, since: float) -> dict:
        """Run the device's health check of its active release now."""
        return self.client.health_check()

    def rollback(self, model: str, version: str) -> None:
        self.client.rollback()

    def pull_telemetry(self, db: sqlite_utils.Database) -> None:
        pull_device(db, self.client)


def transport_for(workspace: Workspace, device: dict, rollout: dict,
                  config: ClientConfig = ClientConfig()) -> DeviceTransport:
    """The way to `device` (a devices row) for `rollout` (its rollouts row): call home if the
    device has a fleet server, else push."""
    if device.get("server_url"):
        from stctl.rollout_call_home import CallHomeDevice

        return CallHomeDevice(workspace, device["name"], rollout)
    return PushDevice(DeviceClient.for_device(workspace, device, config))
