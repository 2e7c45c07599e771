"""Errors that reach the user as one line (the CLI prints `error: <message>` and exits 1).

Every message names the file involved and the fix, so nobody has to read a traceback.
"""


class OpdError(Exception):
    """A user-facing error: bad input, a mismatched or corrupt file, a bad config value."""


class FormatError(OpdError):
    """A file is not a valid opd shard/manifest of a version this reader understands, or is corrupt."""


class FingerprintMismatch(OpdError):
    """A shard or manifest was produced by something other than what the caller expects."""
