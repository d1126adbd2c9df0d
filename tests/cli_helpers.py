"""Assertions on CLI results (typer.testing), shared by the CLI tests."""
from __future__ import annotations


def assert_one_error_line(result, *mentions: str) -> str:
    """The command failed with exit 1, printed exactly one `error: ...` line on stderr naming each
    of `mentions`, nothing on stdout, and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "", result.stdout
    for m in mentions:
        assert m in lines[0], (m, lines[0])
    return lines[0]
