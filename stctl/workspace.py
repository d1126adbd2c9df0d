"""The fleet workspace: where it is, what is inside, its config, and how files in it are written.

Layout (DESIGN.md): `stctl.toml` (config), `repository/metadata/` and `repository/targets/`
(the TUF repository, static files), `pki/` (fleet CA, operator certificate), `keys/` (TUF
signing keys, 0600), `fleet.db`.

Rules: a directory is a workspace when it holds `stctl.toml` (written last by `stctl init`);
every file in it is written whole or not at all (`common.files.atomic_write`: temp file in the same
folder, fsync, `os.replace`); commands that change the repository hold the workspace lock, so two
publishes never interleave.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from common.locks import FileLock
from manifests.release import METADATA_DIR, TARGETS_DIR
from common.durations import parse_duration_s
from stctl.errors import WorkspaceError

CONFIG_FILE = "stctl.toml"
LOCK_FILE = ".stctl.lock"
ENV_WORKSPACE = "STCTL_WORKSPACE"
ENV_PASSPHRASE = "STCTL_KEY_PASSPHRASE"

def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `45s` -> timedelta (`common.durations`' grammar, > 0)."""
    return timedelta(seconds=parse_duration_s(text, f"duration {text!r}", positive=True, error=WorkspaceError))


@dataclass(frozen=True)
class Expiry:
    """How long each signed role stays valid; `bundle` is the offline bundles' own expiry."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    bundle: timedelta = timedelta(days=90)


@dataclass(frozen=True)
class Config:
    """The contents of `stctl.toml`."""

    expiry: Expiry = Expiry()
    keys_encrypted: bool = False


def render_config(config: Config) -> str:
    def days(d: timedelta) -> str:
        return f"{d.days}d" if d == timedelta(days=d.days) else f"{int(d.total_seconds())}s"

    e = config.expiry
    return (
        "# SmallThinker Fleet workspace (made by `stctl init`)\n\n"
        "[keys]\n"
        f"# true: the private keys in keys/ are encrypted with the passphrase in ${ENV_PASSPHRASE}\n"
        f"encrypted = {'true' if config.keys_encrypted else 'false'}\n\n"
        "[expiry]\n"
        "# how long each newly signed role stays valid (s, m, h or d); `stctl repo refresh` renews the timestamp\n"
        f'root = "{days(e.root)}"\ntargets = "{days(e.targets)}"\nsnapshot = "{days(e.snapshot)}"\n'
        f'timestamp = "{days(e.timestamp)}"\n'
        "# offline bundles carry their own snapshot and timestamp, valid this long\n"
        f'bundle = "{days(e.bundle)}"\n'
    )


def parse_config(text: str, where: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise WorkspaceError(f"{where}: not valid TOML ({e})") from None
    expiry = data.get("expiry", {})
    known = set(Expiry.__dataclass_fields__)
    unknown = set(expiry) - known
    if unknown:
        raise WorkspaceError(f"{where}: [expiry] has unknown roles {sorted(unknown)}; known: {sorted(known)}")
    encrypted = data.get("keys", {}).get("encrypted", False)
    if not isinstance(encrypted, bool):
        raise WorkspaceError(f"{where}: [keys] encrypted must be true or false")
    return Config(expiry=Expiry(**{k: parse_duration(v) for k, v in expiry.items()}), keys_encrypted=encrypted)


@dataclass(frozen=True)
class Workspace:
    """A fleet workspace directory and its config."""

    root: Path
    config: Config

    @property
    def repository(self) -> Path:
        return self.root / "repository"

    @property
    def metadata_dir(self) -> Path:
        return self.repository / METADATA_DIR

    @property
    def targets_dir(self) -> Path:
        return self.repository / TARGETS_DIR

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def fleet_db(self) -> Path:
        return self.root / "fleet.db"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for commands that change the repository or the keys."""
        busy = WorkspaceError(f"{self.root}: another stctl command is changing this workspace; try again")
        with FileLock(self.root / LOCK_FILE).held(busy):
            yield


def open_workspace(path: str | os.PathLike | None = None) -> Workspace:
    """The workspace at `path` (default: $STCTL_WORKSPACE, else the current directory)."""
    root = Path(path or os.environ.get(ENV_WORKSPACE) or ".").resolve()
    config_path = root / CONFIG_FILE
    try:
        text = config_path.read_text()
    except FileNotFoundError:
        raise WorkspaceError(f"{root}: not a fleet workspace (no {CONFIG_FILE}); "
                             "create one with `stctl init DIR`") from None
    return Workspace(root=root, config=parse_config(text, str(config_path)))
