"""Application keys from the operator's side: `stctl device app-key create|list|revoke`.

An application key is what a shop-floor application sends a device with its completions
(`Authorization: Bearer stk_...`); the format and its digest are `manifests.app_keys`.

Rules:
- a key is made here, its sha256 is put on each chosen device through the operator API, and the
  key itself is handed back once, to be shown once: it is stored nowhere. fleet.db's `app_keys`
  table keeps one row per device and key: name, the first 8 hex of the digest (to match an
  audit), when it was created and when it was revoked (NULL while it is valid);
- devices are chosen by name and/or by tags (every enrolled device whose tags hold all the given
  ones, the rule of rollout waves, `manifests.rollout_plan.select_devices`);
- `create` is all or nothing: every device is asked first (it answers, and has no key of that
  name: a key is never replaced behind the application that uses it); if putting the key on one
  device fails anyway, it is deleted again from the devices that got it, nothing is recorded and
  the error names the device;
- the device is the authority on which keys it accepts; fleet.db is the record of what the
  operator issued. `list` shows both side by side and flags a key found on only one of them;
- `revoke` deletes on the device first, then records the revocation; a device that has no such
  key is an error (and a record that still called it valid is marked revoked, since it is not).
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone


from manifests import ManifestError
from manifests.app_keys import key_digest, new_key
from manifests.enrollment import parse_tag
from manifests.names import check_name
from manifests.rollout_plan import RolloutPlan, Wave, select_devices
from stctl.device_client import DeviceClient, DeviceError, map_devices
from stctl.errors import StctlError
from stctl.fleetdb import open_fleet_db
from stctl.registry import enrolled, now_iso, write_transaction
from stctl.workspace import Workspace

DIGEST_PREFIX_HEX = 8
CONCURRENCY = 16  # devices asked at once
# `list` statuses: on both sides, on the device only, in fleet.db only
OK, DEVICE_ONLY, RECORDED_ONLY = "ok", "device_only", "recorded_only"


class AppKeyError(StctlError):
    """An application key cannot be created, listed or revoked (bad name, name taken, no such key)."""




# ---- choosing devices and asking each ---------------------------------------------------------
def chosen_devices(workspace: Workspace, names: list[str] = (), tags: list[str] = ()) -> list[dict]:
    """The enrolled devices named, plus those whose tags hold all of `tags` (`KEY=VALUE`), by name."""
    if not names and not tags:
        raise AppKeyError("name at least one device, or select devices with --tag KEY=VALUE")
    try:
        wanted = dict(parse_tag(t) for t in tags)
    except ManifestError as e:
        raise AppKeyError(str(e)) from None
    chosen = {d["name"]: d for d in enrolled(workspace, list(names))} if names else {}
    if wanted:
        fleet = {d["name"]: d for d in enrolled(workspace)}
        try:
            [matching] = select_devices(RolloutPlan((Wave("app-key", tags=wanted),)),
                                        {name: d["tags"] for name, d in fleet.items()})
        except ManifestError:
            raise AppKeyError(f"no enrolled device has the tags {', '.join(tags)}") from None
        chosen.update((name, fleet[name]) for name in matching)
    return [chosen[name] for name in sorted(chosen)]


def _on_each(workspace: Workspace, devices: list[dict], call: Callable[[DeviceClient], object]
             ) -> list[tuple[dict, object, StctlError | None]]:
    """`call(client)` on every device at once: (device, result or None, error or None) in order."""
    def one(device: dict) -> tuple[dict, object, StctlError | None]:
        client = DeviceClient.for_device(workspace, device)
        try:
            return device, call(client), None
        except StctlError as e:
            return device, None, e
        finally:
            client.close()

    return map_devices(one, devices, CONCURRENCY)


def _failures(results: list[tuple[dict, object, StctlError | None]]) -> str:
    return "; ".join(str(error) for _, _, error in results if error is not None)


def _key_name(name: str) -> str:
    try:
        return check_name(name, "app key name")
    except ManifestError as e:
        raise AppKeyError(str(e)) from None


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


# ---- the library API (one call per command) -------------------------------------------------------
def create_app_key(workspace: Workspace, name: str, devices: list[str] = (), tags: list[str] = ()) -> dict:
    """Make a key named `name`, put it on the chosen devices and record it. Returns `{name, key,
    devices, digest_prefix, created}`: the only place the key ever appears."""
    name = _key_name(name)
    targets = chosen_devices(workspace, devices, tags)

    def name_is_free(client: DeviceClient) -> None:
        if any(k["name"] == name for k in client.app_keys()["keys"]):
            raise AppKeyError(f"{client.name} already has an application key named {name!r}; "
                              "revoke it first or choose another name")

    checked = _on_each(workspace, targets, name_is_free)
    if failed := _failures(checked):
        raise AppKeyError(f"{failed} (no key was created)")
    key = new_key()
    digest = key_digest(key)
    put = _on_each(workspace, targets, lambda client: client.put_app_key(name, digest))
    if failed := _failures(put):
        reached = [device for device, _, error in put if error is None]
        undo = _on_each(workspace, reached, lambda client: client.revoke_app_key(name))
        left = [device["name"] for device, _, error in undo if error is not None]
        stuck = f"; it could not be removed again from {', '.join(left)}: revoke it there" if left else ""
        raise AppKeyError(f"{failed} (no key was created{stuck})")
    created = now_iso()
    db = open_fleet_db(workspace.fleet_db)
    try:
        with write_transaction(db):
            for device in targets:  # an earlier record of this name is stale: the device had no such key
                db.execute("UPDATE app_keys SET revoked_at = ? WHERE device = ? AND name = ? AND revoked_at IS NULL",
                           [created, device["name"], name])
                db["app_keys"].insert({"device": device["name"], "name": name,
                                       "digest_prefix": digest[:DIGEST_PREFIX_HEX], "created_at": created,
                                       "revoked_at": None})
    finally:
        db.close()
    return {"name": name, "key": key, "devices": [d["name"] for d in targets],
            "digest_prefix": digest[:DIGEST_PREFIX_HEX], "created": created}


def list_app_keys(workspace: Workspace, device: str) -> dict:
    """What `device` says it accepts beside what fleet.db recorded as valid there: `{device,
    required, keys: [{name, status, device_created, recorded_created, digest_prefix}]}`, where
    `status` is `ok`, `device_only` (not issued through stctl, or its record lost) or
    `recorded_only` (gone from the device, e.g. removed there by hand)."""
    [target] = enrolled(workspace, [device])
    client = DeviceClient.for_device(workspace, target)
    try:
        answer = client.app_keys()
    finally:
        client.close()
    on_device = {k["name"]: k for k in answer["keys"]}
    db = open_fleet_db(workspace.fleet_db)
    try:
        recorded = {r["name"]: r for r in db["app_keys"].rows_where("device = ? AND revoked_at IS NULL", [device],
                                                                    order_by="id")}
    finally:
        db.close()
    keys = []
    for key_name in sorted(on_device.keys() | recorded.keys()):
        seen, record = on_device.get(key_name), recorded.get(key_name)
        keys.append({"name": key_name, "status": OK if seen and record else DEVICE_ONLY if seen else RECORDED_ONLY,
                     "device_created": _iso(seen["created"]) if seen else None,
                     "recorded_created": record["created_at"] if record else None,
                     "digest_prefix": record["digest_prefix"] if record else None})
    return {"device": device, "required": answer["required"], "keys": keys}


def revoke_app_key(workspace: Workspace, name: str, devices: list[str] = (), tags: list[str] = ()) -> dict:
    """Delete the key `name` on the chosen devices and record it revoked: `{name, devices, revoked_at}`.
    Every device is tried; if one fails, the error names it (and says where the key was revoked)."""
    name = _key_name(name)
    targets = chosen_devices(workspace, devices, tags)

    def revoke(client: DeviceClient) -> None:
        try:
            client.revoke_app_key(name)
        except DeviceError as e:
            if e.status_code == 404:
                raise AppKeyError(f"{client.name} has no application key named {name!r}") from None
            raise

    results = _on_each(workspace, targets, revoke)
    revoked_at = now_iso()
    gone = [device["name"] for device, _, error in results if error is None or isinstance(error, AppKeyError)]
    db = open_fleet_db(workspace.fleet_db)
    try:
        with write_transaction(db):
            for device in gone:
                db.execute("UPDATE app_keys SET revoked_at = ? WHERE device = ? AND name = ? AND revoked_at IS NULL",
                           [revoked_at, device, name])
    finally:
        db.close()
    done = [device["name"] for device, _, error in results if error is None]
    if failed := _failures(results):
        raise AppKeyError(failed + (f" (revoked on {', '.join(done)})" if done else ""))
    return {"name": name, "devices": done, "revoked_at": revoked_at}
