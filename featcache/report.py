"""Paper-format tables of a pipeline's results: methods as rows, FPR95 and AUROC per ood split and
their average, best values marked; written as Markdown, CSV and LaTeX.

The configuration shown per method is the one `featcache select` chose on pseudo-OOD data when a
selection.csv exists, otherwise the best of the sweep on the test OOD data, which the table then
labels as an oracle.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.sweep import MEAN, best_per_method, read_csv


def table_rows(results_dir: Path) -> tuple[list[dict], list[str], str]:
    """(one dict per method: {method, params, <ood>: row}, ood names, which configuration is shown)."""
    selection = results_dir / "selection.csv"
    sweep = results_dir / "sweep.csv"
    if selection.exists():
        rows = [r for r in read_csv(selection) if r["choice"] == "selected"]
        chosen = {(r["method"], r["params"]) for r in rows}
        label = "configuration selected on pseudo-OOD (id_val against corrupted id_val), never on test OOD"
    elif sweep.exists():
        rows = read_csv(sweep)
        chosen = {(r["method"], r["params"]) for r in best_per_method(rows)}
        label = "ORACLE: best configuration of the sweep on the test OOD data (lowest mean FPR95)"
    else:
        raise FeatcacheError(f"{results_dir}: no sweep.csv or selection.csv; run `featcache sweep` first")
    oods = list(dict.fromkeys(r["ood"] for r in rows if r["ood"] != MEAN))
    table = {}
    for r in rows:
        if (r["method"], r["params"]) in chosen:
            table.setdefault(r["method"], {"method": r["method"], "params": r["params"]})[r["ood"]] = r
    return list(table.values()), oods, label


def _best(table, column, metric):
    values = [t[column][metric] for t in table]
    return min(values) if metric == "fpr95" else max(values)


def cells(table, oods):
    """Header and rows of percent strings, with a flag for the best value in each column."""
    columns = oods + [MEAN]
    header = ["method", "params"] + [f"{c} {m}" for c in columns for m in ("FPR95", "AUROC")]
    body = []
    for t in table:
        row = [(t["method"], False), (t["params"], False)]
        for c in columns:
            for metric in ("fpr95", "auroc"):
                value = t[c][metric]
                row.append((f"{100 * value:.2f}", value == _best(table, c, metric)))
        body.append(row)
    return header, body


def to_markdown(table, oods, label) -> str:
    header, body = cells(table, oods)
    lines = [f"_{label}; percent; best in bold; FPR95 lower is better, AUROC higher_", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in body:
        lines.append("| " + " | ".join(f"**{v}**" if best else v.replace("|", "\\|") for v, best in row) + " |")
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


def write_tables(results_dir: Path) -> dict[str, Path]:
    table, oods, label = table_rows(results_dir)
    out = {}
    for suffix, text in (("md", to_markdown(table, oods, label)), ("csv", to_csv(table, oods)),
                         ("tex", to_latex(table, oods, label))):
        path = results_dir / f"table.{suffix}"
        path.write_text(text)
        out[suffix] = path
    return out
