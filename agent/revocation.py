"""The device's certificate revocation list (CRL): which fleet certificates its API refuses.

Rules:
- the CRL comes from the operator as the signed TUF target `pki/crl.pem`
  (`manifests.release.CRL_TARGET`): with every update job (and from a bundle that carries it),
  every `Limits.crl_refresh_s` in the daemon (`CrlRefresher`, in a TUF metadata folder of its own,
  `tuf-crl/`, so it never contends with an update job for `tuf/`), and in the enrollment file.
  TUF makes it signed, never rolled back and never withheld past the timestamp's expiry; a
  repository without the target (an older fleet) has revoked nothing, which is not an error;
- `DeviceCrl.take` keeps a CRL only if it is a fleet CRL of the device's CA (`manifests.crl`:
  issued and signed by `tls/ca.crt`), usable on this device's clock now (lastUpdate passed,
  nextUpdate not: OpenSSL would otherwise refuse every client certificate), and newer than the
  one held: a higher CRL number (a lower one is a rollback) and a later lastUpdate (OpenSSL
  enforces the latest). The same CRL again is nothing to do. Anything else raises
  RevocationError and the held CRL stays;
- it is written atomically to `tls/crl.pem`, one writer at a time across processes
  (`tls/.crl.lock`, waited for up to `LOCK_WAIT_S`);
- the running server enforces the file's CRL on every new TLS handshake (`agent.server`).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509

from agent.config import DeviceConfig
from agent.errors import AgentError
from agent.fetcher import FetcherConfig
from common.files import atomic_write
from common.locks import FileLock
from agent.tuf_client import ClientConfig, fetch_crl
from manifests import ManifestError
from manifests.crl import MAX_CRL_BYTES, FleetCrl, read_crl

log = logging.getLogger("st-agent.revocation")
CRL_FILE = "crl.pem"  # in tls/
CRL_METADATA_DIR = "tuf-crl"  # the periodic refresh's TUF metadata folder, in the data dir
LOCK_WAIT_S = 10.0


class RevocationError(AgentError):
    """A CRL is refused (not of the fleet CA, older than the one held, not usable now)."""


def crl_file(config: DeviceConfig) -> Path:
    return config.tls_dir / CRL_FILE


def load_ca(config: DeviceConfig) -> x509.Certificate:
    return x509.load_pem_x509_certificate(config.ca_cert.read_bytes())


def read_crl_file(path: Path, ca: x509.Certificate) -> FleetCrl | None:
    """The CRL in `path` (None if there is none); RevocationError if it is not a fleet CRL of `ca`."""
    try:
        with open(path, "rb") as f:
            pem = f.read(MAX_CRL_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        return read_crl(pem, ca)
    except ManifestError as e:
        raise RevocationError(f"{path}: {e}") from None


class DeviceCrl:
    """The CRL a data dir holds."""

    def __init__(self, config: DeviceConfig):
        self.config = config
        self.path = crl_file(config)

    def current(self) -> FleetCrl | None:
        """The held CRL (None without one, or if the file is unreadable: a valid CRL may replace it)."""
        try:
            return read_crl_file(self.path, load_ca(self.config))
        except RevocationError as e:
            log.warning("%s", e)
            return None

    def take(self, pem: bytes) -> bool:
        """Keep `pem` if it is a newer fleet CRL (see the module rules); False if it is the one held."""
        try:
            crl = read_crl(pem, load_ca(self.config))
        except ManifestError as e:
            raise RevocationError(str(e)) from None
        now = datetime.now(timezone.utc)
        if not crl.usable_at(now):
            raise RevocationError(f"CRL {crl.number} is valid from {crl.last_update} to {crl.next_update}, not now "
                                  f"({now:%Y-%m-%d %H:%M:%S} UTC on this device's clock); keeping the CRL held")
        with self._locked():
            held = self.current()
            if held is not None and crl.pem == held.pem:
                return False
            if held is not None and crl.number <= held.number:
                raise RevocationError(f"CRL {crl.number} is not newer than the CRL {held.number} held (a rollback?); "
                                      "keeping the CRL held")
            if held is not None and crl.last_update <= held.last_update:
                raise RevocationError(f"CRL {crl.number} was issued ({crl.last_update}) no later than the CRL "
                                      f"{held.number} held ({held.last_update}); keeping the CRL held")
            atomic_write(self.path, crl.pem)
        log.info("CRL %d taken: %d certificate(s) revoked", crl.number, len(crl.revoked))
        return True

    def offer(self, pem: bytes) -> None:
        """`take`, logging a refusal instead of raising it (the update channel's sink: a bad CRL
        is reported, the release goes on)."""
        try:
            self.take(pem)
        except (RevocationError, OSError) as e:
            log.warning("CRL from the repository refused: %s", e)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        refused = RevocationError(f"{self.path}: another process kept the CRL lock for {LOCK_WAIT_S:g}s")
        with FileLock(self.path.with_name(".crl.lock")).held(refused, wait_s=LOCK_WAIT_S):
            yield


class CrlRefresher:
    """The daemon's periodic CRL refresh: one fetch at start, then one every `crl_refresh_s`.
    A fetch that fails (repository unreachable, refused CRL) is logged and tried at the next period."""

    def __init__(self, config: DeviceConfig):
        self.config = config
        self.crl = DeviceCrl(config)
        self.interval = config.limits.crl_refresh_s
        # no retries within a period (the next period is the retry); a stalled socket ends in its timeout
        self.client_config = ClientConfig(fetcher=FetcherConfig(socket_timeout=config.limits.download_socket_timeout_s,
                                                                retry_window_s=0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Fetch the CRL target once; True if a newer CRL was taken."""
        pem = fetch_crl(self.config.data_dir / CRL_METADATA_DIR, self.config.repository_url,
                        self.config.trusted_root.read_bytes(), self.client_config, stop=self._stop)
        return pem is not None and self.crl.take(pem)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except (AgentError, OSError) as e:
                log.warning("CRL refresh from %s failed: %s", self.config.repository_url, e)
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="crl-refresh", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
