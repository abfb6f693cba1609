"""User-facing errors: one line, no traceback, a non-zero exit."""


class UserError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``str(err)`` as one line on stderr and exits with ``exit_code``.
    The message must name the file (and line or key where known) and say what to do.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
