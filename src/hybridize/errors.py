"""The one exception type for user mistakes: the CLI prints its message as one sentence and exits 2."""


class UserError(Exception):
    """Bad input from the user (path, field, layer index, file contents): never a stack trace."""
