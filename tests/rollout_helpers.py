"""Helpers of the rollout tests: a fleet of three real agents enrolled in one workspace (`Fleet3`,
started by the `fleet3` fixture of rollout_fixtures.py), what each runs, and the update jobs each
was asked for since an instant of its clock (the agents run on this host: its clock)."""
from __future__ import annotations

from pathlib import Path

import sqlite_utils

from agent_helpers import Agent
from stctl.fleetdb import open_fleet_db
from stctl.rollout_policy import ROLLOUT_FINAL

DEVICES = {"d1": ["ring=canary", "line=4"], "d2": ["ring=main", "line=4"], "d3": ["ring=main", "line=5"]}
V1 = {"model": "st-demo", "version": "1.0.0"}
V2 = {"model": "st-demo", "version": "2.0.0"}
WAIT_S = 240.0


class Fleet3:
    def __init__(self, ws, agents: dict[str, Agent]):
        self.ws, self.agents = ws, agents

    def set_url(self, name: str, url: str) -> None:
        db = open_fleet_db(self.ws.fleet_db)
        db["devices"].update(name, {"url": url})
        db.close()

    def active(self) -> dict[str, dict]:
        return {name: a.status()["active"] for name, a in self.agents.items()}

    def jobs_since(self, marks: dict[str, float], version: str = "2.0.0") -> dict[str, set[str]]:
        """Update jobs to `version` created on each device since its mark (device clock)."""
        out = {}
        for name, a in self.agents.items():
            rows = a.get("/v1/telemetry", params={"table": "updates", "since": marks[name], "limit": 1000}).json()["rows"]
            out[name] = {r["job_id"] for r in rows if r["to_version"] == version and r["state"] == "idle"}
        return out

    def plan(self, tmp_path: Path, text: str) -> Path:
        path = tmp_path / "plan.toml"
        path.write_text(text)
        return path


def latest_unfinished(ws) -> dict | None:
    """The newest rollout of the workspace if it is unfinished (read without migrating fleet.db)."""
    db = sqlite_utils.Database(ws.fleet_db)
    try:
        if "rollouts" not in db.table_names():
            return None
        rows = list(db.query("SELECT * FROM rollouts ORDER BY id DESC LIMIT 1"))
        return rows[0] if rows and rows[0]["state"] not in ROLLOUT_FINAL else None
    finally:
        db.close()
