"""The one error type of the command line's functions."""


class CommandError(Exception):
    """A failure of a command's input (a spec that does not import, a file of the wrong kind...):
    the command line prints its message on one line and exits with status 1."""
