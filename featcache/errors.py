"""The one exception type that the CLI turns into a one-line message instead of a traceback."""


class FeatcacheError(Exception):
    """A user-facing problem: bad input, a broken cache, a refused operation.

    The message must name the file, field or value at fault; the CLI prints it on one line
    and exits with status 1.
    """
