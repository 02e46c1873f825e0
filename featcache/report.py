"""What a person looks at after a sweep: paper-format tables (Markdown, CSV, LaTeX), figures (PNG)
and one self-contained HTML page with all of them.

Tables: methods as rows, FPR95 and AUROC per ood split and their average, best values in bold
(BOLD_RULE). The configuration shown per method is the one `featcache select` chose on pseudo-OOD
data when a selection.csv exists, otherwise the best of the sweep on the test OOD data, which the
table then labels as an oracle. Every output says where its numbers came from (pipeline, cache
fingerprint, backbone, checkpoint, featcache version, date), read from the results' meta files.
Figures: an overview of the methods (the configuration shown, per group of ood splits and mean);
each method's metrics against its swept parameter, the configuration shown marked; and for that
configuration, score histograms of id_test against each ood split with the ROC curves.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from featcache.errors import FeatcacheError, NextStep
from featcache.results import GROUP_PREFIX, MEAN, read_csv
from featcache.tables import best_per_method


def table_rows(results_dir: Path) -> tuple[list[dict], list[str], str]:
    """(one dict per method: {method, params, <ood>: row}, ood names, which configuration is shown).

    The ood names are the splits, then the groups of splits (`group:<label>`, the mean over the
    group), as the CSV has them; each becomes a column of the tables.
    """
    selection = results_dir / "selection.csv"
    sweep = results_dir / "sweep.csv"
    if selection.exists():
        rows = [r for r in read_csv(selection) if r["choice"] == "selected"]
        chosen = {(r["method"], r["params"]) for r in rows}
        label = "configuration selected on pseudo-OOD (id_val against corrupted id_val), never on test OOD"
    elif sweep.exists():
        rows = read_csv(sweep)
        chosen = {(r["method"], r["params"]) for r in best_per_method(rows)}
        label = ("ORACLE: best configuration of the sweep on the test OOD data (lowest mean FPR95); "
                 "`featcache select PIPELINE` chooses on pseudo-OOD instead")
    else:
        raise NextStep(f"{results_dir}: no sweep.csv or selection.csv", "featcache sweep PIPELINE")
    oods = list(dict.fromkeys(r["ood"] for r in rows if r["ood"] != MEAN))
    table = {}
    for r in rows:
        if (r["method"], r["params"]) in chosen:
            table.setdefault(r["method"], {"method": r["method"], "params": r["params"]})[r["ood"]] = r
    return list(table.values()), oods, label


# Which cells are bold. Values are compared as shown (percent, two decimals), so what looks equal is
# equal. The best value of a column is bold on every row that has it, unless every row has it: a
# column where all methods tie (or a table of one method) has nothing to single out, and bolding
# every cell would read as "all best" when it means "no difference".
BOLD_RULE = "bold: a column's best value, unless every method ties on it"


def bold_flags(values: list[str], metric: str) -> list[bool]:
    """Per shown value (percent strings of one column), whether it is bold under BOLD_RULE."""
    numbers = [float(v) for v in values]
    if not numbers:
        return []
    best = min(numbers) if metric == "fpr95" else max(numbers)
    flags = [n == best for n in numbers]
    return [False] * len(flags) if all(flags) else flags


def cells(table, oods):
    """Header and rows of percent strings, with a flag for the bold values (BOLD_RULE) of each column."""
    columns = oods + [MEAN]
    header = ["method", "params"] + [f"{c} {m}" for c in columns for m in ("FPR95", "AUROC")]
    body = [[(t["method"], False), (t["params"], False)] for t in table]
    for c in columns:
        for metric in ("fpr95", "auroc"):
            shown = [f"{100 * t[c][metric]:.2f}" for t in table]
            for row, value, bold in zip(body, shown, bold_flags(shown, metric)):
                row.append((value, bold))
    return header, body


RESULTS_FILES = ("sweep.csv", "selection.csv")


def provenance(results_dir: Path) -> list[tuple[str, list[tuple[str, str]] | None]]:
    """Per results file present in `results_dir`, its provenance fields from the meta file beside
    it (featcache.results.provenance_fields), or None when it has no meta file (older results)."""
    from featcache.results import provenance_fields, read_meta

    out = []
    for name in RESULTS_FILES:
        if (results_dir / name).exists():
            meta = read_meta(results_dir / name)
            out.append((name, None if meta is None else provenance_fields(meta)))
    return out


def provenance_text(name: str, fields) -> str:
    from featcache.results import meta_path

    if fields is None:
        return f"{name}: provenance unknown: no {meta_path(name).name} beside it (results written by an older featcache)"
    return f"{name}: " + "; ".join(f"{k} {v}" for k, v in fields)


def to_markdown(table, oods, label, sources=()) -> str:
    """The results table; `sources` (`provenance` of the results directory) listed under it."""
    header, body = cells(table, oods)
    lines = [f"_{label}; percent; {BOLD_RULE}; FPR95 lower is better, AUROC higher_", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in body:
        lines.append("| " + " | ".join(f"**{v}**" if best else v.replace("|", "\\|") for v, best in row) + " |")
    if sources:
        lines += ["", "Provenance:", ""] + [f"- {provenance_text(name, fields)}" for name, fields in sources]
    return "\n".join(lines) + "\n"


def to_csv(table, oods) -> str:
    header, body = cells(table, oods)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header + ["best"])
    for row in body:
        writer.writerow([v for v, _ in row] + [";".join(h for h, (_, best) in zip(header, row) if best)])
    return buf.getvalue()


def _tex(text: str) -> str:
    """Escape the characters of method and split names that LaTeX treats specially."""
    for char in "_&%#$":
        text = text.replace(char, "\\" + char)
    return text


def to_latex(table, oods, label) -> str:
    columns = oods + [MEAN]
    lines = [r"\begin{tabular}{l" + "cc" * len(columns) + "}", r"\toprule",
             "Method & " + " & ".join(rf"\multicolumn{{2}}{{c}}{{{_tex(c)}}}" for c in columns) + r" \\",
             " & " + " & ".join(r"FPR95$\downarrow$ & AUROC$\uparrow$" for _ in columns) + r" \\", r"\midrule"]
    _, body = cells(table, oods)
    for row in body:
        values = [rf"\textbf{{{v}}}" if best else v for v, best in row[2:]]
        lines.append(_tex(row[0][0]) + " & " + " & ".join(values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", f"% {label}"]
    return "\n".join(lines) + "\n"


def overview_columns(oods: list[str]) -> tuple[list[str], str]:
    """The columns of the overview figure and what they are: the groups of ood splits and the
    mean, or, where the splits form no groups, each split and the mean."""
    groups = [o for o in oods if o.startswith(GROUP_PREFIX)]
    return (groups + [MEAN], "group of ood splits") if groups else (oods + [MEAN], "ood split")


def figure_name(kind: str, method: str) -> str:
    return f"{kind}_{method.replace('+', '_plus_')}.png"


def results_fingerprint(results_dir: Path) -> str | None:
    """The cache fingerprint the results in `results_dir` came from; refuses results of two caches."""
    from featcache.results import meta_path

    found = {}
    for name in ("sweep.csv", "selection.csv"):
        meta = meta_path(results_dir / name)
        if (results_dir / name).exists() and meta.exists():
            try:
                found[name] = json.loads(meta.read_text(encoding="utf-8"))["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):
                raise FeatcacheError(f"{meta}: not a readable results meta file") from None
    if len(set(found.values())) > 1:
        raise FeatcacheError(f"{results_dir}: sweep.csv and selection.csv come from different caches (fingerprints "
                             f"{found['sweep.csv'][:12]} and {found['selection.csv'][:12]}); run them again on one cache")
    return next(iter(found.values()), None)


def write_figures(results_dir: Path, cache_path) -> list[tuple[str, Path]]:
    """Sensitivity figures from sweep.csv, and score figures recomputed from the cache."""
    from featcache.cache.reader import open_cache
    from featcache.methods import get_method
    from featcache.plots import overview_figure, scores_figure, sensitivity_figure
    from featcache.replay import check_fingerprint, load_replay

    figures_dir = results_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    table, oods, label = table_rows(results_dir)
    shown = "selected on pseudo-OOD" if (results_dir / "selection.csv").exists() else "ORACLE: best on test OOD"
    figures = [(f"Overview: each method's configuration ({shown}), per {overview_columns(oods)[1]} and mean",
                overview_figure(table, overview_columns(oods)[0], figures_dir / "overview.png",
                                f"methods compared, configuration {shown}"))]
    selection = results_dir / "selection.csv"
    selected = ({r["method"]: r for r in read_csv(selection) if r["choice"] == "selected" and r["ood"] == MEAN}
                if selection.exists() else {})
    sweep = results_dir / "sweep.csv"
    if sweep.exists():
        rows = read_csv(sweep)
        for method in dict.fromkeys(r["method"] for r in rows):
            path = sensitivity_figure(method, [r for r in rows if r["method"] == method],
                                      figures_dir / figure_name("sensitivity", method), selected.get(method))
            if path:
                mark = "; star: the configuration selected on pseudo-OOD" if method in selected else ""
                figures.append((f"{method}: metrics against its hyperparameter{mark}", path))
    expected = results_fingerprint(results_dir)
    with open_cache(cache_path) as cache:
        if expected is not None and cache.fingerprint != expected:
            raise FeatcacheError(f"{cache_path}: fingerprint {cache.fingerprint[:12]} is not that of the cache the results "
                                 f"in {results_dir} came from ({expected[:12]}); sweep it again, or report with --cache")
        replay = load_replay(cache)
        for entry in table:
            method, params = get_method(entry["method"]), json.loads(entry["params"])
            id_scores = method(replay.id_test, replay.head, replay.fit, **params).scores
            ood_scores = {ood.name: method(ood, replay.head, replay.fit, **params).scores for ood in replay.oods}
            path = scores_figure(method.name, params, id_scores, ood_scores, figures_dir / figure_name("scores", method.name))
            figures.append((f"{method.name}: scores and ROC ({'selected on pseudo-OOD' if 'selected' in label else 'oracle'})", path))
    check_fingerprint(cache_path, replay.fingerprint)  # the cache was not replaced while the figures were drawn
    return figures


def _html_table(header: list[str], body: list[list[tuple[str, bool]]]) -> str:
    """Numbers right-aligned, text (method, params, provenance) left-aligned; best cells marked."""
    def cell(value, best):
        classes = (["best"] if best else []) + ([] if _is_number(value) else ["text"])
        return f"<td class='{' '.join(classes)}'>{html.escape(value)}</td>" if classes else f"<td>{html.escape(value)}</td>"

    text = [any(not _is_number(row[i][0]) for row in body) for i in range(len(header))]  # headed like its cells
    head = "".join(f"<th class='text'>{html.escape(h)}</th>" if t else f"<th>{html.escape(h)}</th>"
                   for h, t in zip(header, text))
    rows = "".join("<tr>" + "".join(cell(v, best) for v, best in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_provenance(sources) -> str:
    """A table of where the numbers came from: a row per results file, from its meta file."""
    from featcache.results import meta_path

    if not sources:
        return ""
    from featcache.results import provenance_fields

    header = ["results"] + [k for k, _ in provenance_fields({})]
    body = []
    for name, fields in sources:
        if fields is None:
            body.append([(name, False), (f"provenance unknown: no {meta_path(name).name} beside it (results "
                                         "written by an older featcache)", False)] + [("", False)] * (len(header) - 2))
        else:
            body.append([(name, False)] + [(v, False) for _, v in fields])
    return "<h2>Provenance</h2>" + _html_table(header, body).replace("<table>", "<table class='provenance'>", 1)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == ""
    return True


def selection_cells(results_dir: Path):
    """Header and rows of the selection table (selected, paper default, oracle), percent, or None."""
    path = results_dir / "selection.csv"
    if not path.exists():
        return None
    rows = [r for r in read_csv(path) if r["ood"] == MEAN]
    header = ["method"] + [f"{c} {m}" for c in ("selected", "paper default", "ORACLE") for m in ("params", "FPR95", "AUROC")]
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        row = [(method, False)]
        for choice in ("selected", "paper_default", "oracle"):
            r = next((x for x in rows if x["method"] == method and x["choice"] == choice), None)
            if r is None:  # no paper setting on the pipeline's benchmark
                row += [("none for this benchmark", False), ("", False), ("", False)]
                continue
            row += [(r["params"], False), (f"{100 * r['fpr95']:.2f}", False), (f"{100 * r['auroc']:.2f}", False)]
        body.append(row)
    return header, body


def nonpositive_note(results_dir: Path) -> str | None:
    """A sentence, and a table of the configurations concerned, on the nap+X samples with S_X <= 0
    (placed below every positive sample, featcache.methods.nap), from sweep.meta.json; None if the
    sweep has no nap+X in the paper form."""
    meta_path = results_dir / "sweep.meta.json"
    if not meta_path.exists():
        return None
    counts = json.loads(meta_path.read_text()).get("nap_nonpositive") or {}
    configs = [(m, p, c) for m, by_params in counts.items() for p, c in by_params.items()]
    if not configs:
        return None
    touched = [(m, p, c) for m, p, c in configs if any(c.values())]
    text = (f"nap+X in the paper form (S_X^w S_NAP^(1-w)): samples with S_X &lt;= 0, where the power is undefined, "
            f"rank below every positive sample, ordered by S_X. {len(touched)} of {len(configs)} configurations "
            "of the sweep had any.")
    if not touched:
        return f"<p class='note'>{text}</p>"
    splits = list(dict.fromkeys(s for _, _, c in touched for s in c))
    header = ["method", "params"] + [f"{s} S_X<=0" for s in splits]
    body = [[(m, False), (p, False)] + [(str(c.get(s, "")), False) for s in splits] for m, p, c in touched]
    return f"<p class='note'>{text}</p>" + _html_table(header, body)


def write_html(results_dir: Path, name: str, figures: list[tuple[str, Path]]) -> Path:
    """results/<pipeline>/report.html: tables and figures in one file, images embedded."""
    import base64

    table, oods, label = table_rows(results_dir)
    header, body = cells(table, oods)
    parts = [f"<h1>featcache report: {html.escape(name)}</h1>", _html_provenance(provenance(results_dir)),
             f"<p class='note'>{html.escape(label)}. Percent; {BOLD_RULE}. "
             "FPR95: OOD accepted at 95% ID recall (lower is better); AUROC: higher is better.</p>",
             "<h2>Results per ood split</h2>", _html_table(header, body)]
    selection = selection_cells(results_dir)
    if selection:
        parts += ["<h2>Hyperparameter selection</h2>",
                  "<p class='note'>Selected: chosen on id_val against the pseudo_ood splits only. Paper default: "
                  "the source paper's setting. ORACLE: the best on the test OOD data, which no deployment can "
                  "use. Mean over ood splits.</p>", _html_table(*selection)]
    note = nonpositive_note(results_dir)
    if note:
        parts += ["<h2>NAP combinations: scores S_X &lt;= 0</h2>", note]
    parts.append("<h2>Figures</h2>")
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px;"
             "margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
             "td:first-child,th:first-child,.text{text-align:left}.best{font-weight:bold;background:#e8f4e8}"
             ".note{color:#555;font-size:13px}figure{margin:1em 0}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>featcache report: {html.escape(name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = results_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def write_tables(results_dir: Path) -> dict[str, Path]:
    table, oods, label = table_rows(results_dir)
    out = {}
    for suffix, text in (("md", to_markdown(table, oods, label, provenance(results_dir))), ("csv", to_csv(table, oods)),
                         ("tex", to_latex(table, oods, label))):
        path = results_dir / f"table.{suffix}"
        path.write_text(text)
        out[suffix] = path
    return out


def _results_csv(path) -> Path:
    path = Path(path)
    return path / "sweep.csv" if path.is_dir() else path


COMPARE_COLUMNS = ("method", "params", "fpr95_a", "auroc_a", "fpr95_b", "auroc_b", "fpr95_diff", "auroc_diff")


def compare(results_a, results_b, *, partial: bool = False) -> list[dict]:
    """The same grid from two sweeps side by side: mean metrics per configuration and differences.

    Refuses, naming an example, when the two grids are not the same set of configurations and
    ood splits, unless `partial` asks for the configurations they share.
    """
    a_path, b_path = _results_csv(results_a), _results_csv(results_b)
    a, b = read_csv(a_path), read_csv(b_path)
    key = lambda r: (r["method"], r["params"], r["ood"])  # noqa: E731
    a_rows, b_rows = {key(r): r for r in a}, {key(r): r for r in b}
    only_a, only_b = sorted(set(a_rows) - set(b_rows)), sorted(set(b_rows) - set(a_rows))
    if (only_a or only_b) and not partial:
        example = (only_a or only_b)[0]
        where = a_path if only_a else b_path
        raise FeatcacheError(f"the grids differ: {len(only_a)} rows only in {a_path}, {len(only_b)} only in {b_path} "
                             f"(e.g. {example[0]} {example[1]} on {example[2]}, only in {where}); "
                             "pass --partial to compare what they share")
    out = []
    for k in a_rows:
        if k in b_rows and k[2] == MEAN:
            ra, rb = a_rows[k], b_rows[k]
            out.append({"method": k[0], "params": k[1], **{f"{m}_a": ra[m] for m in ("fpr95", "auroc")},
                        **{f"{m}_b": rb[m] for m in ("fpr95", "auroc")},
                        "fpr95_diff": rb["fpr95"] - ra["fpr95"], "auroc_diff": rb["auroc"] - ra["auroc"]})
    return out


def format_compare(rows: list[dict], label_a: str, label_b: str) -> str:
    """A and B side by side per configuration, percent; parameters in full as in the CSVs."""
    from featcache.tables import render, wrap_params

    body = [[r["method"], f"{100 * r['fpr95_a']:.2f}", f"{100 * r['fpr95_b']:.2f}", f"{100 * r['fpr95_diff']:+.2f}",
             f"{100 * r['auroc_a']:.2f}", f"{100 * r['auroc_b']:.2f}", f"{100 * r['auroc_diff']:+.2f}",
             wrap_params(r["params"])] for r in rows]
    table = render(["method", "FPR95 A", "FPR95 B", "B-A", "AUROC A", "AUROC B", "B-A", "params"], body,
                   right=set(range(1, 7)))
    return "\n".join([f"A = {label_a}", f"B = {label_b}", "mean over ood splits, percent", table])
