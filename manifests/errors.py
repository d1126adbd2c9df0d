"""The one exception family of `manifests`: every malformed document raises a ManifestError."""


class ManifestError(ValueError):
    """A document does not follow its format; the message names the bad field."""
