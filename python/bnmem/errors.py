"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class BnmemError(Exception):
    """A problem with the user's input or run folder, with what to do about it in the message."""
