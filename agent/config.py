"""The device's configuration: who it is (from enrollment), where its files live, and its limits.

Data dir layout (every path the agent touches is derived here, relative to the data dir):

    agent.json              this config: name, url, repository_url, tags, limits (written last by `init`)
    tls/ca.crt device.crt device.key   mTLS material from enrollment (key 0600)
    trust/root.json         the TUF root handed over at enrollment
    tuf/  tuf-bundle/       TUF metadata of the online channel and of offline bundles
    store/                  the content-addressed blob store (blobs/, incoming/, partial/, tmp/)
    releases/<model>/<version>/   packages materialized from blobs (hardlinks)
    current.json            the pointer: active and previous release (one atomic replace)
    jobs/<id>.json          update jobs and their lifecycle state
    telemetry.db            generations, updates, health_checks (SQLite, WAL)
    call_home.json          call-home state: report seq, telemetry acked, assignments acted on

Rule: every limit lives in `Limits`; `agent.json` may override any of them by name, and an
unknown name is an error, not silently ignored. The same holds for the optional `call_home`
section (`CallHomeConfig`): absent, the device is push-only (managed over its own API).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from agent.errors import ConfigError
from common.files import atomic_write_json
from manifests import ManifestError
from manifests.call_home import MAX_POLL_S, MAX_ROWS_PER_REPORT
from manifests.enrollment import check_repository_url, check_server_url, parse_device_url, parse_tag
from manifests.model_manifest import check_name

CONFIG_FILE = "agent.json"
ENV_DATA_DIR = "ST_AGENT_DATA_DIR"
DEFAULT_LISTEN = "127.0.0.1:8443"
_OPTIONAL_LIMITS = ("memory_budget_bytes", "threads")  # None: the engine's default


@dataclass(frozen=True)
class Limits:
    """Every cap and bound of the agent."""

    max_body_bytes: int = 64 * 1024  # any request body
    max_tokens: int = 256  # completions: requested max_tokens is capped to this
    max_prompt_tokens: int = 2048
    max_stop_sequences: int = 4
    queue_size: int = 4  # completions admitted beyond the one running per engine; more -> 429
    max_admitted_per_key: int = 4  # of one application key at once (below queue_size + 1: a slot stays for the others)
    token_timeout_s: float = 120.0  # longest wait for the next token of a completion
    telemetry_max_rows: int = 100_000  # per table; the oldest rows go first
    telemetry_page_rows: int = 1000  # most rows one GET /v1/telemetry returns
    jobs_kept: int = 100  # finished update jobs kept on disk
    max_state_visits: int = 3  # entries into one lifecycle state per job (a crash loop ends the job)
    max_probation_boots: int = 3  # starts of a just-activated release before it is rolled back
    memory_budget_bytes: int | None = None  # engine budget (None: every expert resident)
    threads: int | None = None
    pointer_poll_s: float = 2.0  # how often the daemon notices an activation by `st-agent bundle install`
    shutdown_grace_s: float = 10.0
    # downloads: a transport failure is retried with backoff (full jitter) for up to the window
    # without progress; the job then fails and keeps what it received for the next job
    download_retry_window_s: float = 300.0
    download_retry_first_delay_s: float = 1.0
    download_retry_max_delay_s: float = 30.0
    download_socket_timeout_s: float = 30.0  # connect, and the longest gap between bytes
    download_disk_margin_bytes: int = 64 * 2**20  # free space a download must leave (checked before it starts)
    download_leftovers_max_age_s: float = 7 * 86400.0  # kept partial downloads / verified blobs untouched this long go
    handshake_timeout_s: float = 10.0  # a TLS handshake that takes longer is dropped
    request_timeout_s: float = 10.0  # a whole request (head and body) arrives within this of the connection idling
    max_idle_per_client: int = 16  # idle connections kept per client address (the oldest goes first)
    max_idle_connections: int = 128  # idle connections kept in all
    crl_refresh_s: float = 900.0  # how often the daemon fetches the fleet CA's CRL (besides every update job)

    @classmethod
    def from_dict(cls, d: dict) -> Limits:
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ConfigError(f"limits: unknown {sorted(unknown)}; known: {sorted(known)}")
        for name, value in d.items():
            if value is None and name in _OPTIONAL_LIMITS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"limits.{name}: expected a positive number")
        return replace(cls(), **d)


@dataclass(frozen=True)
class CallHomeConfig:
    """Where and how often the device calls home (`agent.call_home`)."""

    server_url: str  # https://HOST:PORT of `stctl server serve`
    poll_s: float = 60.0  # interval until the server first answers, and the first backoff delay
    jitter: float = 0.1  # every delay is stretched by a random fraction in [0, jitter]
    max_backoff_s: float = 900.0  # the longest delay while the server fails
    max_report_rows: int = MAX_ROWS_PER_REPORT  # telemetry rows in one report (the backlog goes in batches)
    timeout_s: float = 30.0  # connect, and the longest wait for the answer

    @classmethod
    def from_dict(cls, d: dict) -> CallHomeConfig:
        if not isinstance(d, dict):
            raise ConfigError("call_home: expected an object")
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            raise ConfigError(f"call_home: unknown {sorted(unknown)}; known: {sorted(known)}")
        try:
            url = check_server_url(d.get("server_url"))
        except ManifestError as e:
            raise ConfigError(f"call_home.server_url: {e}") from None
        bounds = {"poll_s": (0.1, MAX_POLL_S), "jitter": (0.0, 1.0), "max_backoff_s": (0.1, MAX_POLL_S),
                  "max_report_rows": (1, MAX_ROWS_PER_REPORT), "timeout_s": (0.1, 600.0)}
        for name, (low, high) in bounds.items():
            value = d.get(name, getattr(cls, name))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                    or (name == "max_report_rows" and not isinstance(value, int)):
                raise ConfigError(f"call_home.{name}: expected a number in {low:g} .. {high:g}")
        return cls(**{**d, "server_url": url})


@dataclass(frozen=True)
class DeviceConfig:
    """A device's identity and limits, and the paths of its data dir."""

    data_dir: Path
    name: str
    url: str
    repository_url: str
    tags: dict[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    # completions need an application key (`Authorization: Bearer`); false opens them to any
    # client that reaches the port (a trusted LAN, or loopback only)
    app_keys_required: bool = True
    call_home: CallHomeConfig | None = None  # None: push-only, no calling home

    # ---- paths -------------------------------------------------------------------------
    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls_dir / "ca.crt"

    @property
    def device_cert(self) -> Path:
        return self.tls_dir / "device.crt"

    @property
    def device_key(self) -> Path:
        return self.tls_dir / "device.key"

    @property
    def trusted_root(self) -> Path:
        return self.data_dir / "trust" / "root.json"

    @property
    def tuf_dir(self) -> Path:
        return self.data_dir / "tuf"

    @property
    def bundle_tuf_dir(self) -> Path:
        return self.data_dir / "tuf-bundle"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def releases_dir(self) -> Path:
        return self.data_dir / "releases"

    @property
    def packed_cache_dir(self) -> Path:
        """Experts packed for the torch-int4 kernel (used only where the native kernels do not build)."""
        return self.data_dir / "packed-cache"

    @property
    def pointer_file(self) -> Path:
        return self.data_dir / "current.json"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def telemetry_db(self) -> Path:
        return self.data_dir / "telemetry.db"

    @property
    def update_lock(self) -> Path:
        return self.data_dir / ".update.lock"

    @property
    def app_keys_file(self) -> Path:
        """The application keys' names and sha256 digests (never the keys)."""
        return self.data_dir / "app_keys.json"

    @property
    def call_home_state(self) -> Path:
        return self.data_dir / "call_home.json"

    # ---- file --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        limits = {k: v for k, v in asdict(self.limits).items() if v != getattr(Limits(), k)}
        d = {"name": self.name, "url": self.url, "repository_url": self.repository_url, "tags": self.tags,
             "limits": limits, "app_keys_required": self.app_keys_required}
        if self.call_home is not None:
            d["call_home"] = asdict(self.call_home)
        return d

    def save(self) -> None:
        atomic_write_json(self.data_dir / CONFIG_FILE, self.to_dict())


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """`--data-dir`, else $ST_AGENT_DATA_DIR."""
    chosen = data_dir or os.environ.get(ENV_DATA_DIR)
    if not chosen:
        raise ConfigError(f"no data dir: pass --data-dir DIR or set ${ENV_DATA_DIR}")
    return Path(chosen).resolve()


def load_config(data_dir: str | os.PathLike) -> DeviceConfig:
    """The config of an initialized data dir."""
    root = Path(data_dir)
    path = root / CONFIG_FILE
    try:
        d = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{root}: not an agent data dir (no {CONFIG_FILE}); run `st-agent init --enroll FILE "
                          f"--data-dir {root}`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("limits", {}), dict) or not isinstance(d.get("tags", {}), dict):
        raise ConfigError(f"{path}: expected an object with name, url, repository_url, tags, limits")
    try:
        check_name(d.get("name"), "name")
        parse_device_url(d.get("url"))
        check_repository_url(d.get("repository_url"))
        for k, v in d.get("tags", {}).items():
            parse_tag(f"{k}={v}")
    except ManifestError as e:
        raise ConfigError(f"{path}: {e}") from None
    required = d.get("app_keys_required", True)
    if not isinstance(required, bool):
        raise ConfigError(f"{path}: app_keys_required: expected true or false")
    call_home = d.get("call_home")
    try:
        call_home = None if call_home is None else CallHomeConfig.from_dict(call_home)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return DeviceConfig(root, d["name"], d["url"], d["repository_url"], dict(d.get("tags", {})),
                        Limits.from_dict(d.get("limits", {})), required, call_home)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)
