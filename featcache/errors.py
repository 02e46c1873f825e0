"""The one exception type that the CLI turns into a one-line message instead of a traceback."""


class FeatcacheError(Exception):
    """A user-facing problem: bad input, a broken cache, a refused operation.

    The message must name the file, field or value at fault; the CLI prints it on one line
    and exits with status 1.
    """


class DiskFull(FeatcacheError):
    """The output's disk filled up. `abandoned`: an HDF5 file whose write failed is still open and
    must never be closed (HDF5 crashes the interpreter when it tries), so the CLI ends the process
    with os._exit after printing the message."""

    def __init__(self, message: str, abandoned: bool = False):
        super().__init__(message)
        self.abandoned = abandoned
