"""TUF signing keys in the workspace's `keys/` folder.

Rules: one Ed25519 key per file, `keys/<role>-<keyid prefix>.pem` (PKCS#8 PEM, mode 0600, in a
0700 folder), encrypted with the passphrase from $STCTL_KEY_PASSPHRASE when the workspace says
so. Which keys sign a role is decided by the repository's root metadata, never by file names:
`load_signers` loads the files whose key id root lists for the role, so a rotation that stops
half-way still signs with exactly the keys root trusts. Key files are never overwritten.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption, Encoding, NoEncryption, PrivateFormat, load_pem_private_key,
)
from securesystemslib.signer import CryptoSigner

from stctl.errors import SigningKeyError
from common.files import atomic_write
from stctl.workspace import ENV_PASSPHRASE, Workspace

ROLES = ("root", "targets", "snapshot", "timestamp")  # a new targets version needs new snapshot and timestamp versions
_KEYID_PREFIX = 16


def passphrase(workspace: Workspace) -> bytes | None:
    """The key passphrase the workspace needs (from the environment), or None if keys are plain."""
    if not workspace.config.keys_encrypted:
        return None
    value = os.environ.get(ENV_PASSPHRASE)
    if not value:
        raise SigningKeyError(f"the signing keys are encrypted: set ${ENV_PASSPHRASE} to their passphrase")
    return value.encode()


def generate_key(keys_dir: Path, role: str, secret: bytes | None) -> CryptoSigner:
    """A new Ed25519 key for `role`, saved in `keys_dir`; returns its signer."""
    if role not in ROLES:
        raise SigningKeyError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    key = Ed25519PrivateKey.generate()
    signer = CryptoSigner(key)
    path = keys_dir / f"{role}-{signer.public_key.keyid[:_KEYID_PREFIX]}.pem"
    if path.exists():
        raise SigningKeyError(f"{path}: already exists; refusing to overwrite a key")
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    encryption = BestAvailableEncryption(secret) if secret else NoEncryption()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
    atomic_write(path, pem, mode=0o600)
    return signer


def key_files(keys_dir: Path, role: str) -> list[Path]:
    return sorted(keys_dir.glob(f"{role}-*.pem"))


def load_signers(keys_dir: Path, role: str, keyids: list[str], secret: bytes | None) -> list[CryptoSigner]:
    """Signers for the key ids root lists for `role`; error if none of them is in `keys_dir`."""
    wanted = {k[:_KEYID_PREFIX]: k for k in keyids}
    signers = []
    for path in key_files(keys_dir, role):
        if path.stem.split("-", 1)[1] not in wanted:
            continue
        try:
            key = load_pem_private_key(path.read_bytes(), secret)
        except TypeError:
            raise SigningKeyError(f"{path}: the key file's encryption does not match stctl.toml "
                                  f"[keys] encrypted = {'true' if secret else 'false'}") from None
        except ValueError:
            raise SigningKeyError(f"{path}: wrong passphrase (${ENV_PASSPHRASE}) or corrupt key file") from None
        signer = CryptoSigner(key)
        if signer.public_key.keyid not in keyids:
            raise SigningKeyError(f"{path}: key id does not match its file name")
        signers.append(signer)
    if not signers:
        raise SigningKeyError(f"no {role} signing key in {keys_dir} matches the repository's root metadata")
    return signers


def remove_keys(keys_dir: Path, role: str, keep: list[str]) -> None:
    """Delete the `role` key files whose key id is not in `keep` (after a rotation)."""
    prefixes = {k[:_KEYID_PREFIX] for k in keep}
    for path in key_files(keys_dir, role):
        if path.stem.split("-", 1)[1] not in prefixes:
            path.unlink()
