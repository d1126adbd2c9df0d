"""The one exception family of `manifests`: every malformed document raises a ManifestError."""


class ManifestError(ValueError):
    """A document does not follow its format; the message names the bad field."""


def json_document(data: bytes, what: str):
    """The JSON value in `data`; ManifestError naming `what` when it is not UTF-8 JSON."""
    import json

    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{what}: not valid JSON ({e})") from None
