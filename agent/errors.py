"""The one exception family of `agent`: every error the agent raises is an AgentError; every
failed update is one of its UpdateError branch.

"Already up to date" is a normal outcome (a fetch that downloads nothing), not an error.
"""


class AgentError(Exception):
    """Base of every error of the device agent (config, install, serving, and the update channel)."""


class UpdateError(AgentError):
    """Base of every update failure; nothing unverified was installed."""


class VerificationError(UpdateError):
    """Signed metadata or a downloaded file failed verification (tampering, rollback, freeze,
    mix-and-match, revoked key, a manifest that disagrees with its signed targets)."""


class DownloadError(UpdateError):
    """The transfer failed: network error, HTTP error status, or more bytes than expected."""


class TransportError(DownloadError):
    """The repository stayed unreachable for the whole retry window (connection refused or reset,
    timeouts, cut transfers, HTTP 5xx/408/429). What was received is still good: the partial
    download and the verified blobs are kept, and the next job resumes from them."""


class UpdateStoppedError(UpdateError):
    """The agent is stopping: the job stops where it is (nothing lost) and resumes at the next start."""


class ReleaseNotFoundError(UpdateError):
    """The repository (or bundle) has no signed release with that model and version."""


class UpdaterBusyError(UpdateError):
    """Another updater is using the same metadata folder."""


class BundleFormatError(UpdateError):
    """An offline bundle file is not a readable bundle."""


class StoreError(UpdateError):
    """The blob store lacks a blob a package needs, or a package cannot be materialized."""


class InsufficientSpaceError(StoreError):
    """The store's filesystem has less free space than the download needs (checked before it starts)."""


class ConfigError(AgentError):
    """The data dir, its config or an enrollment file is missing, malformed or would be overwritten."""


class UnauthorizedError(AgentError):
    """A completion without a valid application key (HTTP 401)."""


class InstallError(AgentError):
    """Activation or rollback is impossible (no such release, no previous release, corrupt pointer)."""


class UpdateRefusedError(AgentError):
    """An update request is refused: a downgrade without allow_downgrade, or another update in progress."""


class QueueFullError(AgentError):
    """The completion queue is full; the client should retry later (HTTP 429)."""


class BadRequestError(AgentError):
    """A completion request the engine cannot run (token ids out of range, prompt too long)."""
