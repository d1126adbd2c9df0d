"""The fleet's certificate revocation list (CRL): what makes one valid, for the operator who
issues it (stctl) and the devices that enforce it (agent).

A fleet CRL is one PEM `X509 CRL` block, at most `MAX_CRL_BYTES`, issued by the fleet CA (its
issuer is the CA's subject) and signed by the CA's key, with a CRL number. Each new CRL has a
higher CRL number and a later lastUpdate than the one before it: devices refuse a lower number
(a rollback), and OpenSSL, holding several CRLs of one CA, enforces the one with the latest
lastUpdate. Freshness comes from TUF (the CRL is a signed target), not from nextUpdate, which is
far away: a CRL past its nextUpdate would make OpenSSL refuse every client certificate.

`enforce_crl` adds a checked CRL to an SSLContext (device server or operator client) and only
then turns on `VERIFY_CRL_CHECK_LEAF`: with the flag and no CRL, OpenSSL refuses every peer
certificate. Python loads CRLs only from a file (`cadata` takes certificates only), so the
exact bytes that were checked go through a private temp file.
"""
from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from manifests.errors import ManifestError

MAX_CRL_BYTES = 1 << 20
PEM_LABEL = "X509 CRL"


@dataclass(frozen=True)
class FleetCrl:
    """A CRL that `read_crl` checked."""

    pem: bytes
    number: int
    last_update: datetime  # aware, UTC
    next_update: datetime | None
    revoked: frozenset[int]  # certificate serial numbers
    crl: x509.CertificateRevocationList

    def usable_at(self, now: datetime) -> bool:
        """Whether OpenSSL accepts it at `now` (lastUpdate passed, nextUpdate not): loading one it
        does not would make it refuse every client certificate."""
        return self.last_update <= now and (self.next_update is None or now < self.next_update)


def read_crl(pem: bytes, ca: x509.Certificate) -> FleetCrl:
    """`pem` as a fleet CRL of the CA `ca` (ManifestError if it is not one)."""
    if not isinstance(pem, bytes) or len(pem) > MAX_CRL_BYTES:
        raise ManifestError(f"CRL: expected at most {MAX_CRL_BYTES} bytes of PEM")
    if pem.count(f"-----BEGIN {PEM_LABEL}-----".encode()) != 1 or b"-----BEGIN CERTIFICATE" in pem:
        raise ManifestError(f"CRL: expected exactly one PEM block ({PEM_LABEL})")
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError as e:
        raise ManifestError(f"CRL: not a readable CRL ({e})") from None
    if crl.issuer != ca.subject:
        raise ManifestError("CRL: not issued by the fleet CA")
    try:
        signed = crl.is_signature_valid(ca.public_key())
    except (TypeError, ValueError):  # a key type or signature algorithm that does not fit
        signed = False
    if not signed:
        raise ManifestError("CRL: not signed by the fleet CA")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise ManifestError("CRL: no CRL number") from None
    except ValueError as e:  # e.g. an extension given twice
        raise ManifestError(f"CRL: unreadable extensions ({e})") from None
    return FleetCrl(pem=pem, number=number, last_update=crl.last_update_utc, next_update=crl.next_update_utc,
                    revoked=frozenset(entry.serial_number for entry in crl), crl=crl)


def enforce_crl(ctx: ssl.SSLContext, crl: FleetCrl) -> None:
    """Make `ctx` refuse the certificates `crl` revokes, from its next handshake on (of several
    CRLs of one CA loaded, OpenSSL enforces the one with the latest lastUpdate)."""
    fd, path = tempfile.mkstemp(prefix="st-crl-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(crl.pem)
        ctx.load_verify_locations(cafile=path)
    finally:
        os.unlink(path)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
