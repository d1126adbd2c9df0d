"""The one exception family of `stctl`: the CLI turns a StctlError into one line and exit 1."""


class StctlError(Exception):
    """Base of every operator-facing error raised by the stctl library."""


class WorkspaceError(StctlError):
    """The fleet workspace is missing, incomplete, or would be overwritten."""


class SigningKeyError(StctlError):
    """A signing key is missing, unreadable, or its passphrase is wrong."""


class PublishError(StctlError):
    """A package cannot be published (bad package, version already published, ...)."""


class ReleaseNotFoundError(StctlError):
    """No release with that model and version in the repository."""


class BundleError(StctlError):
    """An offline bundle cannot be exported."""
