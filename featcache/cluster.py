"""The dask client that `--backend dask` sends batches to."""

from __future__ import annotations

from featcache.errors import FeatcacheError


def dask_client(scheduler: str | None, jobs: int):
    """A dask.distributed client: to the scheduler at `scheduler`, or to a new local cluster."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise FeatcacheError("--backend dask needs dask.distributed: pip install 'featcache[dask]'") from None
    if scheduler:
        try:
            return Client(scheduler, timeout=30)
        except OSError as exc:
            raise FeatcacheError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    return Client(LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None))
