"""`stctl init DIR`: create a fleet workspace (TUF keys and repository, fleet CA, fleet.db, config).

Rules: never overwrite: if DIR already holds any workspace entry, nothing is touched. Everything
is built in a hidden temp folder inside DIR and moved into place with renames, `stctl.toml`
last, so DIR becomes a workspace only once it is complete. Keys are encrypted when
$STCTL_KEY_PASSPHRASE is set, and the config records it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from stctl import keys
from stctl.errors import WorkspaceError
from stctl.fleetdb import open_fleet_db
from stctl.pki import create_pki
from stctl.repository import create_repository
from common.files import atomic_write, fsync_dir
from stctl.workspace import CONFIG_FILE, ENV_PASSPHRASE, Config, Workspace, open_workspace, render_config

# Moved into DIR in this order; the config last marks the workspace complete.
_ENTRIES = ("keys", "pki", "repository", "fleet.db", CONFIG_FILE)


def init_workspace(path: str | os.PathLike, fleet_name: str | None = None) -> Workspace:
    """A new, complete fleet workspace at `path` (created if missing)."""
    root = Path(path).resolve()
    existing = [name for name in _ENTRIES if (root / name).exists()]
    if existing:
        raise WorkspaceError(f"{root}: already holds {', '.join(existing)}; refusing to overwrite "
                             "(an existing workspace keeps its keys)")
    secret = os.environ.get(ENV_PASSPHRASE) or None
    config = Config(keys_encrypted=secret is not None)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".stctl-init-", dir=root))
    try:
        staged = Workspace(tmp, config)
        secret_bytes = secret.encode() if secret else None
        signers = {role: keys.generate_key(staged.keys_dir, role, secret_bytes) for role in keys.ROLES}
        create_repository(staged.repository, signers, config.expiry)
        create_pki(staged.pki_dir, secret_bytes, fleet_name or root.name)
        open_fleet_db(staged.fleet_db).close()
        atomic_write(tmp / CONFIG_FILE, render_config(config).encode())
        for name in _ENTRIES:
            os.rename(tmp / name, root / name)
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_workspace(root)
