"""The error type for user mistakes: entry points print its message as one sentence, no traceback."""


class UserError(ValueError):
    """A wrong input (path, file, flag) with a message that names it and says what to do."""
