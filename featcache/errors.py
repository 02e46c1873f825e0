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


class NextStep(FeatcacheError):
    """Something a command reads is not there (yet): the message says what, and the featcache
    command that makes it, e.g. `featcache extract PIPELINE`. Where the pipeline is known (the CLI
    commands that take one), `for_pipeline` names it in place of PIPELINE."""

    def __init__(self, problem: str, command: str, when: str = "first"):
        self.problem, self.command, self.when = problem, command, when
        super().__init__(f"{problem}; run `{command}` {when}")

    def __reduce__(self):  # raised in a joblib or dask worker, it must unpickle in the parent
        return type(self), (self.problem, self.command, self.when)

    def for_pipeline(self, pipeline, extra: str = "") -> FeatcacheError:
        """The same message with PIPELINE replaced by `pipeline` and `extra` options appended."""
        command = self.command.replace("PIPELINE", str(pipeline)) + extra
        return FeatcacheError(f"{self.problem}; run `{command}` {self.when}")


def missing_cache(path, what: str = "cache file") -> NextStep:
    """A cache that does not exist: `featcache extract` makes it."""
    return NextStep(f"{path}: no such {what}", "featcache extract PIPELINE")
