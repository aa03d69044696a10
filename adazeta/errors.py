"""Errors a user can fix: they are printed as one clear message, without a traceback."""


class AdazetaError(Exception):
    """Base class: a problem with the user's input, with what to do about it."""


class ConfigError(AdazetaError):
    """A config value is invalid or names something that does not exist."""


class DataError(AdazetaError):
    """A data file is missing, or a row or field in it is malformed."""
