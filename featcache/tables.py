"""Terminal tables of results: every value exactly as the CSV has it, columns aligned on every line.

A cell may span several lines (a long `params` is wrapped after its ", " separators, never inside
a value), so the width of a column is that of its widest line and every line of every row is
padded to it: a column starts at the same character on every line of the table.
"""

from __future__ import annotations

from featcache.results import GROUP_PREFIX, MEAN

PARAMS_WIDTH = 40  # wrap params longer than this; a single "key": value longer than it stays whole


def wrap_params(text: str, width: int = PARAMS_WIDTH) -> list[str]:
    """`text` split into lines of at most `width` characters where it can be, breaking only after a
    ", " that separates two JSON items; the lines joined with "" give `text` back exactly (a break
    keeps the ", " at the end of the line before it, less its trailing space, which is restored)."""
    pieces = _top_level_items(text)
    lines, current = [], pieces[0]
    for piece in pieces[1:]:
        if len(current) + 2 + len(piece) <= width:
            current += ", " + piece
        else:
            lines.append(current + ",")
            current = " " + piece  # the separator's space starts the continuation line
    return lines + [current]


def _top_level_items(text: str) -> list[str]:
    """`text` cut at each ", " outside strings and nested brackets (a list value stays whole)."""
    pieces, start, depth, in_string, escaped = [], 0, 0, False, False
    for i, char in enumerate(text):
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth <= 1 and text.startswith(", ", i):
            pieces.append(text[start:i])
            start = i + 2
    return pieces + [text[start:]]


def render(header: list[str], rows: list[list], right: set[int] = frozenset(), gap: str = "  ") -> str:
    """A text table: `header` (one string per column) and `rows`, each cell a string or a list of
    lines; columns in `right` are right-aligned (numbers). A rule of dashes under the header."""
    cells = [[c if isinstance(c, list) else [c] for c in row] for row in [header] + rows]
    widths = [max(len(line) for row in cells for line in row[i]) for i in range(len(header))]

    def line_of(parts):
        text = gap.join(p.rjust(w) if i in right else p.ljust(w) for i, (p, w) in enumerate(zip(parts, widths)))
        return text.rstrip()

    out = []
    for n, row in enumerate(cells):
        height = max(len(c) for c in row)
        for k in range(height):
            out.append(line_of([c[k] if k < len(c) else "" for c in row]))
        if n == 0:
            out.append(gap.join("-" * w for w in widths))
    return "\n".join(out)


def best_per_method(rows: list[dict]) -> list[dict]:
    """Per method, the mean row of its configuration with the lowest mean FPR95 (ties: higher AUROC).

    This is chosen on the test OOD data: an oracle, for reading a sweep, not for deployment.
    """
    best: dict[str, dict] = {}
    for row in rows:
        if row["ood"] != MEAN:
            continue
        current = best.get(row["method"])
        if current is None or (row["fpr95"], -row["auroc"]) < (current["fpr95"], -current["auroc"]):
            best[row["method"]] = row
    return list(best.values())


def format_table(rows: list[dict]) -> str:
    """Paper-style table (percent) of the best configuration per method, averaged over ood splits,
    then FPR95 / AUROC averaged over each group of ood splits (rows `group:<label>`) where there are
    any. Parameters come last, in full, exactly as the CSV's `params` column (wrapped if long)."""
    groups = list(dict.fromkeys(r["ood"] for r in rows if r["ood"].startswith(GROUP_PREFIX)))
    by_config = {(r["method"], r["params"], r["ood"]): r for r in rows if r["ood"] in groups}
    header = (["method", "FPR95", "AUROC", "AUPR-In", "AUPR-Out", "ID acc"]
              + [f"{g[len(GROUP_PREFIX):]} FPR95/AUROC" for g in groups] + ["params"])
    body = []
    for r in sorted(best_per_method(rows), key=lambda r: (r["fpr95"], -r["auroc"])):
        group_cells = [f"{100 * g['fpr95']:.2f} / {100 * g['auroc']:.2f}"
                       for g in (by_config[(r["method"], r["params"], name)] for name in groups)]
        body.append([r["method"]] + [f"{100 * r[m]:.2f}" for m in ("fpr95", "auroc", "aupr_in", "aupr_out", "id_acc")]
                    + group_cells + [wrap_params(r["params"])])
    return render(header, body, right=set(range(1, 6 + len(groups))))
