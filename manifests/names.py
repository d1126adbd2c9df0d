"""Names of things in the fleet, decided in one place (both sides import these rules).

Rules: a name is checked as a whole string (`re.fullmatch`, so no trailing newline slips through
as it does with `$`), ASCII only (no look-alike letters or digits from other scripts), 1 to
`MAX_NAME_LENGTH` characters, starting with a letter or digit (never `.`, `_` or `-`, so never
`.`, `..` or a hidden file):
- a model or device name: lowercase `a-z 0-9 . _ -`; it becomes a folder name, a segment of a
  TUF target path and a certificate common name;
- a label (a rollout plan's wave name, a tag key): the same, upper case allowed.
"""
from __future__ import annotations

import re

from manifests.errors import ManifestError

MAX_NAME_LENGTH = 64
_NAME = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}", re.ASCII)
_LABEL = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}", re.ASCII)
NAME_RULE = f"1-{MAX_NAME_LENGTH} chars of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
LABEL_RULE = f"1-{MAX_NAME_LENGTH} of A-Z a-z 0-9 . _ - (starting alphanumeric)"


def is_name(text: object) -> bool:
    """True if `text` is a model or device name."""
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def is_label(text: object) -> bool:
    """True if `text` is a label: a wave name or a tag key."""
    return isinstance(text, str) and _LABEL.fullmatch(text) is not None


def check_name(text: object, what: str = "name") -> str:
    """`text` if it is a model or device name, else ManifestError naming `what`."""
    if not is_name(text):
        raise ManifestError(f"{what} {text!r} must be {NAME_RULE}")
    return text
