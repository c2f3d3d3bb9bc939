"""Errors a user can act on.

Everything raised as `EnrichError` is shown by the CLI as one line with a
non-zero exit, without a traceback: these are problems with input or
configuration, not bugs.
"""


class EnrichError(Exception):
    """A problem the user can fix; its message is the whole explanation."""


class ConfigError(EnrichError):
    """A setting is missing or invalid."""


class RecordsFileError(EnrichError):
    """A records file cannot be read; the message names the line."""


class ModelError(EnrichError):
    """A model directory is missing, inconsistent or unsafe to load."""


class DatabaseError(EnrichError):
    """The database cannot be reached or is not at the expected schema."""
