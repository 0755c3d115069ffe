"""User-facing errors.

A UserError is something the user can fix (bad input, bad config, missing file). The CLI prints its message and
exits with code 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error the user can fix. The message says what is wrong, where, and what to do."""


class ConfigError(UserError):
    """A training/serving configuration that cannot be used as written."""


class DataError(UserError):
    """A dataset file that cannot be read or has records in the wrong shape."""


class ModelError(UserError):
    """A model that cannot be found, loaded or adapted."""
