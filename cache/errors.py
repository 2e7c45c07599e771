"""Errors that reach the user as one line (the CLI prints `error: <message>` and exits 1).

Every message names the file involved and the fix, so nobody has to read a traceback.
"""

from typing import Any


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def short_value(v: Any) -> str:
    """A value for an error message: sha256 hex digests cut to 16 characters, anything else as is."""
    s = str(v)
    return s[:16] if len(s) == 64 and all(c in "0123456789abcdef" for c in s) else s


class OpdError(Exception):
    """A user-facing error: bad input, a mismatched or corrupt file, a bad config value."""


class FormatError(OpdError):
    """A file is not a valid opd shard/manifest of a version this reader understands, or is corrupt."""


class FingerprintMismatch(OpdError):
    """A shard or manifest was produced by something other than what the caller expects."""
