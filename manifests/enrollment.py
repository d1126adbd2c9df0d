"""The enrollment file (`smallthinker-fleet/enrollment@1`) and the certificate role marker.

`stctl device enroll` writes the file, `st-agent init` reads it; it carries everything a device
needs to join the fleet: its name, tags and the URL it serves on, its TLS key and certificate
(signed by the fleet CA), the CA certificate, the TUF trusted root and the repository URL, and
the fleet's current certificate revocation list when it has one (`crl_pem`, optional: absent
before the first revocation and in files of older stctl versions; `manifests.crl` checks it).

Rules: a file that parses is complete: the name is a device name (`manifests.names`), the
device URL is `https://HOST:PORT`, the repository URL is http(s), tags are short `k=v` strings
(the key a label of `manifests.names`, the value without control characters), the PEM fields
hold PEM blocks and the trusted root is a TUF root document. A URL is refused (ManifestError,
never urllib's ValueError) when urllib cannot parse it (`http://[::1`, a port out of range) or
it holds whitespace, control characters or a lone surrogate. Role markers: every leaf
certificate of the fleet carries exactly one SAN URI `urn:st:role:<role>`; `certificate_role`
reads it (the device API admits management calls only from the `operator` role).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from cryptography import x509

from manifests.errors import ManifestError, json_document
from manifests.names import LABEL_RULE, check_name, is_label

ENROLLMENT_FORMAT = "smallthinker-fleet/enrollment@1"
ROLE_URI_PREFIX = "urn:st:role:"
ROLE_OPERATOR = "operator"
ROLE_DEVICE = "device"
MAX_TAGS = 32
_TAG_VALUE = re.compile(r"[^\x00-\x1f\x7f]{0,128}")
_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # urlsplit silently drops some of these


def parse_tag(text: str) -> tuple[str, str]:
    """`line=4` -> ("line", "4")."""
    key, sep, value = text.partition("=")
    if not sep or not is_label(key) or not _TAG_VALUE.fullmatch(value):
        raise ManifestError(f"tag {text!r}: expected KEY=VALUE (key: {LABEL_RULE}; value: up to 128 chars)")
    return key, value


def _split_url(url: object) -> SplitResult | None:
    """The parts of `url`, or None when it is not a string urllib parses whole (host and port included)."""
    if not isinstance(url, str) or _URL_UNSAFE.search(url):
        return None
    try:
        url.encode("utf-8")  # a lone surrogate (UnicodeEncodeError is a ValueError)
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number in 0-65535)
    except ValueError:  # e.g. "Invalid IPv6 URL" for http://[::1
        return None
    return parts


def parse_device_url(url: str) -> tuple[str, int]:
    """`https://HOST:PORT` -> (host, port)."""
    parts = _split_url(url)
    if not parts or parts.scheme != "https" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise ManifestError(f"device url {url!r}: expected https://HOST:PORT, e.g. https://10.0.4.17:8443")
    return parts.hostname, parts.port


def check_server_url(url: str) -> str:
    """`url` if it is the fleet server's `https://HOST[:PORT]` (the device calls home there), else ManifestError."""
    parts = _split_url(url)
    if not parts or parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") or parts.query \
            or parts.fragment:
        raise ManifestError(f"server url {url!r}: expected https://HOST[:PORT], e.g. https://fleet.plant.lan:8444")
    return url.rstrip("/")


def check_repository_url(url: str) -> str:
    """`url` if it is an http(s) URL of a repository folder (no query, no fragment), else ManifestError."""
    if not url:
        raise ManifestError("repository url: missing; expected http(s)://HOST[:PORT][/PATH]")
    parts = _split_url(url)
    if not parts or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ManifestError(f"repository url {url!r}: expected http(s)://HOST[:PORT][/PATH]")
    return url


def _check_pem(text, label: str, what: str) -> str:
    if not isinstance(text, str) or f"-----BEGIN {label}" not in text or "-----END" not in text:
        raise ManifestError(f"enrollment.{what}: expected a PEM block ({label})")
    return text


def _check_root(text) -> str:
    try:
        root = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        root = None
    if not isinstance(root, dict) or not isinstance(root.get("signed"), dict) or root["signed"].get("_type") != "root":
        raise ManifestError("enrollment.trusted_root: expected a TUF root.json document")
    return text


@dataclass(frozen=True)
class Enrollment:
    """What one device receives to join the fleet."""

    name: str
    url: str  # where the device serves its API: https://HOST:PORT
    repository_url: str  # the TUF repository (metadata/ and targets/ under it)
    ca_cert_pem: str
    device_cert_pem: str
    device_key_pem: str
    trusted_root: str  # root.json text, byte for byte as the repository signed it
    tags: dict[str, str] = field(default_factory=dict)
    crl_pem: str | None = None  # the fleet CA's CRL at enrollment (None: nothing revoked yet)
    server_url: str | None = None  # the fleet server the device calls home to (None: push only)

    @classmethod
    def from_dict(cls, d) -> Enrollment:
        if not isinstance(d, dict):
            raise ManifestError("enrollment: expected a JSON object")
        if d.get("format") != ENROLLMENT_FORMAT:
            raise ManifestError(f"enrollment.format: expected {ENROLLMENT_FORMAT!r}")
        tags = d.get("tags", {})
        if not isinstance(tags, dict) or len(tags) > MAX_TAGS:
            raise ManifestError(f"enrollment.tags: expected an object of at most {MAX_TAGS} tags")
        for k, v in tags.items():
            parse_tag(f"{k}={v}" if isinstance(v, str) else "")
        url = d.get("url")
        parse_device_url(url)
        return cls(
            name=check_name(d.get("name"), "enrollment.name"),
            url=url,
            repository_url=check_repository_url(d.get("repository_url")),
            ca_cert_pem=_check_pem(d.get("ca_cert_pem"), "CERTIFICATE", "ca_cert_pem"),
            device_cert_pem=_check_pem(d.get("device_cert_pem"), "CERTIFICATE", "device_cert_pem"),
            device_key_pem=_check_pem(d.get("device_key_pem"), "PRIVATE KEY", "device_key_pem"),
            trusted_root=_check_root(d.get("trusted_root")),
            tags=dict(tags),
            crl_pem=None if d.get("crl_pem") is None else _check_pem(d["crl_pem"], "X509 CRL", "crl_pem"),
            server_url=None if d.get("server_url") is None else check_server_url(d["server_url"]),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Enrollment:
        return cls.from_dict(json_document(data, "enrollment"))

    def to_bytes(self) -> bytes:
        d = {"format": ENROLLMENT_FORMAT, **{k: v for k, v in self.__dict__.items() if v is not None}}
        return (json.dumps(d, sort_keys=True, indent=1) + "\n").encode()


def certificate_role(cert: bytes) -> str | None:
    """The role marker (`operator`, `device`) of a PEM or DER certificate; None without exactly one."""
    try:
        parsed = x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----") \
            else x509.load_der_x509_certificate(cert)
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    roles = [u[len(ROLE_URI_PREFIX):] for u in san.get_values_for_type(x509.UniformResourceIdentifier)
             if u.startswith(ROLE_URI_PREFIX)]
    return roles[0] if len(roles) == 1 else None
