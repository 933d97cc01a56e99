"""Errors a user can cause; entry points print their message alone, without a stack trace."""


class UserError(ValueError):
    """Bad configuration, data, checkpoint or request; the message names what is wrong."""


class ConfigError(UserError):
    """A configuration value that cannot work; the message names the key."""


class DataError(UserError):
    """Bad data or data configuration; the message names the file, column or row."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or not one of ours."""


def user_error_in(error: BaseException) -> UserError | None:
    """The user error behind ``error``, following the chain Hydra wraps around it."""
    seen = error
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
