"""The `featcache` command line. User mistakes end as one line on stderr and exit status 1."""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import contextmanager

import click

from featcache.errors import FeatcacheError, NextStep


@contextmanager
def next_step(pipeline, cache_option=None):
    """A missing cache or results file (NextStep) names the command to run with PIPELINE as the user
    typed it; a cache given with --cache is made by `featcache extract PIPELINE --out` that path."""
    try:
        yield
    except NextStep as exc:
        extra = f" --out {shlex.quote(str(cache_option))}" if cache_option and "extract" in exc.command else ""
        raise exc.for_pipeline(shlex.quote(str(pipeline)), extra) from None


@click.group()
@click.version_option(package_name="featcache")
def cli():
    """Extract backbone features once; replay post-hoc OOD detectors from the cache."""


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["h5", "zarr"]), default=None,
              help="Cache format; by default the suffix of the pipeline's `cache:` path (HDF5 unless .zarr).")
@click.option("--out", type=click.Path(), default=None, help="Cache path (default: the pipeline's `cache:`).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at the output path.")
@click.option("--if-missing", is_flag=True, help="Do nothing if the cache already exists (as `make extract` does).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--shard", default=None, metavar="I/N",
              help="Extract only shard I of N of every split (0-based), for `featcache merge`. Under torchrun, "
                   "RANK/WORLD_SIZE give it.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: the pipeline's extract.device, else cpu).")
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None,
              help="Run the backbone under autocast; outputs are stored as float32.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load a checkpoint that needs full unpickling (a whole pickled model); this runs code from the file.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def extract(pipeline, fmt, out, overwrite, if_missing, batch_size, shard, device, amp, trust_checkpoint, quiet):
    """Run the backbone once per split of PIPELINE and write its feature cache.

    An interrupted extraction leaves <cache>.partial; running the same command again resumes it when
    nothing that shapes the numbers changed (otherwise it starts afresh and says why).
    """
    from pathlib import Path

    from featcache.config import load_pipeline
    from featcache.extract.runner import extract as run_extract

    import os

    spec = load_pipeline(pipeline)
    shard_spec = parse_shard(shard) if shard else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard_spec is None and world > 1:  # launched by torchrun: one shard per process, one GPU each
        shard_spec = (int(os.environ["RANK"]), world)
        if device is None and os.environ.get("LOCAL_RANK") is not None:
            import torch

            device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else None
    target = Path(out) if out else spec.cache
    target = target.with_suffix("." + fmt) if fmt else target
    if shard_spec and not out:
        target = target.with_name(f"{target.stem}.shard{shard_spec[0]}of{shard_spec[1]}{target.suffix}")
    if if_missing and target.exists() and not overwrite:
        click.echo(f"{target} exists; not extracting again (use --overwrite to redo it)")
        return
    path = run_extract(spec, out=target, overwrite=overwrite,
                       batch_size=batch_size, progress=not quiet, shard=shard_spec, device=device, amp=amp,
                       trust_checkpoint=trust_checkpoint)
    click.echo(f"wrote {path}")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise FeatcacheError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise FeatcacheError(f"--shard {text!r}: I must be in 0..N-1")
    return index, count


@cli.command()
@click.argument("source", type=click.Path())
@click.argument("target", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing TARGET.")
def convert(source, target, overwrite):
    """Copy cache SOURCE to TARGET, HDF5 (.h5) <-> Zarr (.zarr), without loss."""
    from featcache.cache.convert import convert as run_convert

    click.echo(f"wrote {run_convert(source, target, overwrite=overwrite)}")


@cli.command()
@click.argument("target", type=click.Path())
@click.argument("shards", nargs=-1, required=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing TARGET.")
def merge(target, shards, overwrite):
    """Join SHARDS (caches from `featcache extract --shard i/n`) into one cache TARGET."""
    from featcache.cache.convert import merge as run_merge

    try:
        merged = run_merge(shards, target, overwrite=overwrite)
    except NextStep as exc:  # a shard that is not there yet: name how shards are made
        raise NextStep(exc.problem, exc.command + " --shard I/N", exc.when) from None
    click.echo(f"wrote {merged}")


@cli.command()
@click.argument("cache", type=click.Path())
def info(cache):
    """Print each split's role, shapes, dtypes and completeness, and the cache's provenance."""
    from featcache.cache.reader import open_cache
    from featcache.cache.schema import ROOT_ATTRS, SPLIT_ARRAYS

    with open_cache(cache) as c:
        click.echo(f"{c.path} ({c.format})")
        for key in ROOT_ATTRS:
            value = c.attrs.get(key, "(missing)")
            if key == "preprocessing" and isinstance(value, str) and value.startswith("{"):
                click.echo(f"  {key}:")  # one line per split: the resolved source and transform
                for name, entry in json.loads(value).items():
                    click.echo(f"    {name}: {json.dumps(entry, sort_keys=True)}")
            else:
                click.echo(f"  {key}: {value}")
        weight = c.store.shape("/head/weight")
        click.echo(f"  head: weight {weight} bias {c.store.shape('/head/bias')}")
        click.echo("splits:")
        for split in c.splits(allow_incomplete=True):
            attrs = split.attrs
            status = "complete" if split.complete else f"INCOMPLETE ({attrs.get('rows_written', 0)}/{split.n} rows)"
            extra = f" corruption={attrs.get('corruption')} severity={attrs.get('severity')}" if split.role == "pseudo_ood" else ""
            extra += f" group={attrs['group']}" if attrs.get("group") else ""
            click.echo(f"  {split.name}: role={split.role} n={split.n} source={attrs.get('source')} {status}{extra}")
            for key in SPLIT_ARRAYS:
                if split.has(key):
                    click.echo(f"    {key:<9} {split.dtype(key):<8} {split.shape(key)}")
                else:
                    click.echo(f"    {key:<9} MISSING")


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--cache", "cache_path", type=click.Path(), default=None, help="Cache to read (default: the pipeline's `cache:`).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Results CSV (default: results/<pipeline name>/sweep.csv).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches of configurations run in parallel joblib workers (same results as serial).")
@click.option("--backend", type=click.Choice(["loky", "dask"]), default="loky", show_default=True,
              help="joblib backend for --jobs; dask sends batches to a dask.distributed cluster.")
@click.option("--scheduler", default=None, help="With --backend dask: the scheduler's address (default: a local cluster).")
@click.option("--overwrite", is_flag=True, help="Replace --out even if it is not a sweep results file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(pipeline, cache_path, out, jobs, backend, scheduler, overwrite, quiet):
    """Replay every method and grid of PIPELINE's `sweep:` from its cache; write metrics per ood split.

    Finished configurations are kept (keyed by cache fingerprint, method and parameters), so an
    interrupted sweep, run again, computes only what is missing.
    """
    from featcache.allocator import keep_freed_memory
    from featcache.config import load_pipeline
    from featcache.sweep import run_sweep
    from featcache.results import provenance_line
    from featcache.tables import format_table

    keep_freed_memory()
    spec = load_pipeline(pipeline)
    out = out or spec.results_dir / "sweep.csv"
    with next_step(pipeline, cache_path):
        rows = run_sweep(spec.sweep, cache_path or spec.cache, out, jobs=jobs, progress=not quiet, backend=backend,
                         scheduler=scheduler, groups=spec.groups, groups_where=f"{spec.path}: groups",
                         overwrite=overwrite, pipeline=spec.name, plugins=spec.plugins,
                         plugins_base=spec.path.resolve().parent, plugins_where=spec.path)
    n_configs = len({(r["method"], r["params"]) for r in rows})
    click.echo(f"{n_configs} configurations -> {out}")
    click.echo("best configuration per method by mean FPR95 (ties: AUROC) on the test OOD splits (an oracle), "
               "mean over ood splits, percent:")
    click.echo(format_table(rows))
    click.echo(provenance_line(out))


@cli.command(name="select")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--cache", "cache_path", type=click.Path(), default=None, help="Cache to read (default: the pipeline's `cache:`).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Results CSV (default: results/<pipeline name>/selection.csv).")
@click.option("--criterion", type=click.Choice(["auroc", "fpr95"]), default=None,
              help="What the search maximises on pseudo-OOD: mean AUROC (default) or minus mean FPR95.")
@click.option("--overwrite", is_flag=True, help="Replace --out even if it is not a selection results file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def select_command(pipeline, cache_path, out, criterion, overwrite, quiet):
    """Choose each method's hyperparameters on id_val against pseudo_ood splits only, then evaluate.

    Shows the chosen configuration beside the papers' default and the oracle (best on test OOD).
    """
    from featcache.allocator import keep_freed_memory
    from featcache.config import load_pipeline
    from featcache.results import provenance_line
    from featcache.select import format_selection, select_to_csv

    keep_freed_memory()
    spec = load_pipeline(pipeline)
    spec.load_plugins()  # before any work: the grid may name their methods
    options = dict(spec.raw.get("select") or {})
    out = out or spec.results_dir / "selection.csv"
    with next_step(pipeline, cache_path):
        rows = select_to_csv(spec.sweep, cache_path or spec.cache, out,
                             criterion=criterion or options.get("criterion", "auroc"),
                             paper_defaults=options.get("paper_defaults"), benchmark=spec.benchmark,
                             groups=spec.groups, groups_where=f"{spec.path}: groups", progress=not quiet,
                             overwrite=overwrite, pipeline_path=spec.path, pipeline=spec.name)
    click.echo(f"selection -> {out}")
    click.echo(f"mean over ood splits, percent; paper defaults for benchmark {spec.benchmark or '(none declared)'}; "
               f"the ORACLE rows are the best on the test OOD data by the criterion "
               f"({criterion or options.get('criterion', 'auroc')}):")
    click.echo(format_selection(rows, spec.benchmark))
    click.echo(provenance_line(out))


@cli.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--cache", "cache_path", type=click.Path(), default=None, help="Cache to read (default: the pipeline's `cache:`).")
@click.option("--no-figures", is_flag=True, help="Tables only.")
def report(pipeline, cache_path, no_figures):
    """Write PIPELINE's report: tables (Markdown, CSV, LaTeX), figures (PNG) and report.html."""
    from featcache.config import load_pipeline
    from featcache.report import write_figures, write_html, write_tables

    spec = load_pipeline(pipeline)
    spec.load_plugins()  # the score figures recompute the results' methods, plugins' too
    with next_step(pipeline, cache_path):
        paths = write_tables(spec.results_dir)
        click.echo(paths["md"].read_text())
        figures = [] if no_figures else write_figures(spec.results_dir, cache_path or spec.cache)
        page = write_html(spec.results_dir, spec.name, figures)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()) + f", {len(figures)} figures, {page}")


@cli.command(name="scores")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--method", required=True, help="A method (`featcache methods` lists them), e.g. ash_s or nap+energy.")
@click.option("--params", "params_json", default="{}", show_default=True,
              help='The method\'s parameters as a JSON object, e.g. \'{"p": 90}\'; the rest take their defaults.')
@click.option("--out", required=True, type=click.Path(),
              help="Output file; its suffix chooses the format: .parquet, .csv or .npz.")
@click.option("--cache", "cache_path", type=click.Path(), default=None, help="Cache to read (default: the pipeline's `cache:`).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def scores_command(pipeline, method, params_json, out, cache_path, overwrite):
    """Write one configuration's per-sample scores on every split of PIPELINE's cache to --out.

    Columns: split, role, group, id, label, score (higher = more in-distribution), prediction. Its
    provenance (method, parameters, cache fingerprint) goes to <out>.meta.json beside it.
    """
    from featcache.api import check_scores_path, scores, write_scores
    from featcache.config import load_pipeline

    spec = load_pipeline(pipeline)
    spec.load_plugins()  # the method may be a plugin's
    try:
        params = json.loads(params_json)
    except ValueError as exc:
        raise FeatcacheError(f"--params {params_json!r}: not JSON ({exc})") from None
    if not isinstance(params, dict):
        raise FeatcacheError(f"--params {params_json!r}: expected a JSON object such as '{{\"p\": 90}}'")
    target = check_scores_path(out, overwrite)  # before the work, not after it
    with next_step(pipeline, cache_path):
        table = scores(cache_path or spec.cache, method, groups=spec.groups, **params)
    write_scores(table, target, overwrite=overwrite)
    click.echo(f"{table.attrs['method']} {table.attrs['params']}: {len(table)} samples of "
               f"{table['split'].nunique()} splits -> {target} (cache fingerprint {table.attrs['fingerprint'][:12]})")


@cli.command()
@click.argument("cache", type=click.Path())
def upgrade(cache):
    """Upgrade a version-1 CACHE to version 2 in place: verify every checksum, then rewrite only the
    root and head attributes (schema, content fingerprint, head checksums)."""
    from featcache.cache.upgrade import upgrade as run_upgrade

    click.echo(run_upgrade(cache))


@cli.command()
@click.argument("cache", type=click.Path())
@click.option("--sample-rows", type=click.IntRange(min=1), default=512, show_default=True,
              help="Rows per split on which logits are checked against features and head.")
def verify(cache, sample_rows):
    """Check CACHE against the contract: schema, datasets, shapes, completeness, checksums, logits.

    Exits 0 when every check passes, 1 otherwise.
    """
    from featcache.cache.verify import verify as run_verify

    checks = run_verify(cache, sample_rows=sample_rows)
    failed = [c for c in checks if not c.ok]
    for c in failed:
        click.echo(f"FAIL {c.what}")
    click.echo(f"{cache}: {len(checks) - len(failed)} of {len(checks)} checks passed" +
               ("" if failed else "; the cache is intact"))
    if failed:
        sys.exit(1)


@cli.command(name="compare")
@click.argument("results_a", type=click.Path(exists=False))
@click.argument("results_b", type=click.Path(exists=False))
@click.option("--partial", is_flag=True, help="Compare only the configurations both sweeps have.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the comparison as CSV.")
@click.option("--overwrite", is_flag=True, help="Replace --out even if it is not a comparison file.")
def compare_command(results_a, results_b, partial, out, overwrite):
    """Show the same grid from two sweeps (two backbones, or a teammate's cache) side by side.

    RESULTS_A and RESULTS_B are sweep.csv files or the results directories holding them.
    """
    from pathlib import Path

    from featcache.report import COMPARE_COLUMNS, compare, format_compare
    from featcache.results import guard_output, write_csv

    if out:
        guard_output(out, "compare", overwrite, COMPARE_COLUMNS)  # before the work, not after it
    rows = compare(results_a, results_b, partial=partial)
    click.echo(format_compare(rows, str(results_a), str(results_b)))
    if out:
        write_csv(rows, Path(out), COMPARE_COLUMNS)


@cli.command(name="methods")
@click.option("--benchmark", type=click.Choice(["cifar10", "cifar100", "imagenet"]), default=None,
              help="Show the papers' settings on this benchmark only (default: all three).")
@click.option("--pipeline", type=click.Path(dir_okay=False), default=None,
              help="Also list the methods of this pipeline's `plugins:`.")
def methods_command(benchmark, pipeline):
    """List every method with its parameters and defaults, and the papers' settings per benchmark.

    Methods of plugins (installed packages' entry points, and with --pipeline the pipeline's
    `plugins:`) are listed with where they come from.
    """
    from featcache.config import load_pipeline
    from featcache.methods import REGISTRY, get_method
    from featcache.methods.registry import BENCHMARKS
    from featcache.plugins import load_plugins

    if pipeline:
        load_pipeline(pipeline).load_plugins()
    else:
        load_plugins([])  # the entry points of installed packages

    benchmarks = [benchmark] if benchmark else list(BENCHMARKS)

    def paper(method):
        cells = []
        for b in benchmarks:
            value = method.paper_default(b)
            none = "none in the seeds" if method.origin == "featcache" else "none given"  # a plugin's own papers
            shown = none if value is None else (", ".join(f"{k}={v}" for k, v in value.items()) or "-")
            cells.append(f"{b}: {shown}")
        return "; ".join(cells)

    names = sorted(REGISTRY) + [f"nap+{n}" for n in sorted(REGISTRY) if n != "nap"]
    for name in names:
        try:
            method = get_method(name)
        except FeatcacheError:
            continue  # a plugin whose parameters take NAP's names (w, eps, form) has no nap+ form
        if name.startswith("nap+") and all(method.paper_default(b) is None for b in benchmarks):
            continue  # nap+<method> is listed where the papers give it a setting; every other works too
        params = ", ".join(f"{k}={v}" for k, v in method.defaults.items() if v is not None)
        choice = "; ".join(" or ".join(group) for group in method.one_of)
        offset = f"  [nap+ takes S_X = score + {method.nap_offset:g}]" if method.nap_offset else ""
        click.echo(f"{name:<13} {params}{'  (' + choice + ')' if choice else ''}{offset}")
        click.echo(f"{'':<13}   paper: {paper(method)}")
        if method.origin != "featcache":
            click.echo(f"{'':<13}   from {method.origin}")
    click.echo("nap+<method>  w=0.5, eps=1.0, form=paper (S_X^w S_NAP^(1-w)) or exp, and the method's own parameters")


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="featcache", standalone_mode=False)
    except FeatcacheError as exc:
        click.echo(f"featcache: error: {exc}", err=True)
        if getattr(exc, "abandoned", False):  # see errors.DiskFull: skip the exit handlers HDF5 crashes in
            import os

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("featcache: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("featcache: interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        click.echo(f"featcache: error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
