"""Terminal tables of sweep results."""

from __future__ import annotations

from featcache.results import GROUP_PREFIX, MEAN


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
    then FPR95 / AUROC averaged over each group of ood splits (rows `group:<label>`) where there are any."""
    groups = list(dict.fromkeys(r["ood"] for r in rows if r["ood"].startswith(GROUP_PREFIX)))
    by_config = {(r["method"], r["params"], r["ood"]): r for r in rows if r["ood"] in groups}
    head = (f"{'method':<14} {'params':<44} {'FPR95':>7} {'AUROC':>7} {'AUPR-In':>8} {'AUPR-Out':>8} {'ID acc':>7}"
            + "".join(f" {g[len(GROUP_PREFIX):] + ' FPR95/AUROC':>20}" for g in groups))
    lines = [head, "-" * len(head)]
    for r in sorted(best_per_method(rows), key=lambda r: (r["fpr95"], -r["auroc"])):
        cells = "".join(f" {100 * g['fpr95']:11.2f} / {100 * g['auroc']:6.2f}"
                        for g in (by_config[(r["method"], r["params"], name)] for name in groups))
        lines.append(f"{r['method']:<14} {r['params']:<44} {100 * r['fpr95']:7.2f} {100 * r['auroc']:7.2f} "
                     f"{100 * r['aupr_in']:8.2f} {100 * r['aupr_out']:8.2f} {100 * r['id_acc']:7.2f}{cells}")
    return "\n".join(lines)
