"""Figures of a sweep: metric against hyperparameter, score histograms and ROC curves (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.results import GROUP_PREFIX, MEAN

SWEEP_AXES = ("p", "percentile", "clip", "k", "w", "T", "alpha_scale", "alpha")  # preferred x axis, in order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def varying_params(rows: list[dict]) -> list[str]:
    """The parameters that take more than one value among `rows` (one method's configurations)."""
    values: dict[str, set] = {}
    for row in rows:
        for key, value in json.loads(row["params"]).items():
            values.setdefault(key, set()).add(json.dumps(value))
    return [k for k, v in values.items() if len(v) > 1]


def sensitivity_figure(method: str, rows: list[dict], path: Path, selected: dict | None = None) -> Path | None:
    """FPR95 and AUROC against the method's swept parameter, a line per ood split (dashed: per group
    of splits) and the mean.

    With a second swept parameter (RG's T, say), only the mean is drawn, a line per value of it.
    `selected` (the mean row of selection.csv's selected configuration, when there is one) is marked
    by a vertical line at its value of the swept parameter and a star at its mean metrics: it need
    not be a grid point (nap+X's w comes from a binary search). Returns None when the method has no
    swept parameter.
    """
    varying = varying_params(rows)
    if not varying:
        return None
    x_key = next((k for k in SWEEP_AXES if k in varying), varying[0])
    other = [k for k in varying if k != x_key]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 3.8))
    if other:
        series = {}
        for row in rows:
            if row["ood"] != MEAN:
                continue
            params = json.loads(row["params"])
            label = ", ".join(f"{k}={params[k]}" for k in other)
            series.setdefault(label, []).append((params[x_key], row))
        styles = {label: {} for label in series}
    else:
        series = {}
        for row in rows:
            series.setdefault(row["ood"], []).append((json.loads(row["params"])[x_key], row))
        styles = {label: ({"color": "black", "linewidth": 2.5} if label == MEAN else
                          {"linestyle": "--", "linewidth": 2} if label.startswith(GROUP_PREFIX) else {"alpha": 0.8})
                  for label in series}
    for ax, metric, title in ((axes[0], "fpr95", "FPR95 (lower is better)"), (axes[1], "auroc", "AUROC (higher is better)")):
        for label, points in series.items():
            points.sort(key=lambda t: t[0])
            ax.plot([p for p, _ in points], [100 * r[metric] for _, r in points], marker="o", label=label, **styles[label])
        if selected is not None and isinstance(json.loads(selected["params"]).get(x_key), (int, float)):
            x_sel = json.loads(selected["params"])[x_key]
            ax.axvline(x_sel, color="tab:green", linestyle=":", linewidth=1.5)
            ax.plot([x_sel], [100 * selected[metric]], marker="*", markersize=16, color="tab:green",
                    markeredgecolor="black", linestyle="none", zorder=5,
                    label=f"selected on pseudo-OOD ({x_key}={json.dumps(x_sel)}), mean")
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the plot, never over a line
    fig.suptitle(f"{method}: sensitivity to {x_key}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def roc_points(id_scores: np.ndarray, ood_scores: np.ndarray):
    """(FPR, TPR) at every distinct threshold, starting at (0, 0)."""
    thresholds = np.unique(np.concatenate([id_scores, ood_scores]))[::-1]
    sorted_id, sorted_ood = np.sort(id_scores), np.sort(ood_scores)
    tpr = (len(sorted_id) - np.searchsorted(sorted_id, thresholds, side="left")) / len(sorted_id)
    fpr = (len(sorted_ood) - np.searchsorted(sorted_ood, thresholds, side="left")) / len(sorted_ood)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def scores_figure(method: str, params: dict, id_scores: np.ndarray, ood_scores: dict, path: Path) -> Path:
    """Histograms of id_test scores against each ood split's, and the ROC curves, for one configuration."""
    plt = _pyplot()
    n = len(ood_scores)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.6 * (n + 1), 3.4))
    finite_id = id_scores[np.isfinite(id_scores)]
    for ax, (name, scores) in zip(axes[:n], ood_scores.items()):
        finite = scores[np.isfinite(scores)]
        both = np.concatenate([finite_id, finite])
        bins = np.linspace(both.min(), both.max(), 50) if both.size and both.min() < both.max() else 20
        ax.hist(finite_id, bins=bins, alpha=0.55, density=True, label="id_test", color="tab:blue")
        ax.hist(finite, bins=bins, alpha=0.55, density=True, label=name, color="tab:red")
        ax.set_title(f"id_test vs {name}", fontsize=9)
        ax.set_xlabel("score (higher = more ID)", fontsize=8)
        ax.set_ylabel("density (each histogram has area 1)", fontsize=8)
        ax.legend(fontsize=7)
    roc = axes[n]
    for name, scores in ood_scores.items():
        fpr, tpr = roc_points(id_scores, scores)
        roc.plot(fpr, tpr, label=name)
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.axhline(0.95, color="grey", linewidth=0.8, linestyle="--", label="TPR 0.95 (FPR95 read here)")
    roc.set_xlabel("FPR (OOD accepted)", fontsize=8)
    roc.set_ylabel("TPR (ID accepted)", fontsize=8)
    roc.set_title("ROC", fontsize=9)
    roc.legend(fontsize=7)
    label = ", ".join(f"{k}={v}" for k, v in params.items())
    fig.suptitle(f"{method} ({label})" if label else method)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def overview_figure(table: list[dict], columns: list[str], path: Path, title: str) -> Path:
    """Every method's configuration as shown in the report (`table`: report.table_rows) side by side:
    FPR95 and AUROC (percent) per column of `columns` (groups of ood splits, or the splits where
    there are no groups, then the mean), a bar each; methods ordered by mean AUROC, best on top."""
    plt = _pyplot()
    table = sorted(table, key=lambda t: t[MEAN]["auroc"])  # barh draws the first at the bottom
    n, m = len(table), len(columns)
    height = 0.8 / m
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.32 * n * max(1.0, m / 2.5)), sharey=True)
    y = np.arange(n)
    colors = {c: ("black" if c == MEAN else None) for c in columns}
    for ax, metric, label in ((axes[0], "fpr95", "FPR95 (%), lower is better"), (axes[1], "auroc", "AUROC (%), higher is better")):
        for j, column in enumerate(columns):
            name = column[len(GROUP_PREFIX):] if column.startswith(GROUP_PREFIX) else column
            ax.barh(y + (m - 1 - j - (m - 1) / 2) * height, [100 * t[column][metric] for t in table], height=height,
                    label=f"{name} (mean of the group)" if column.startswith(GROUP_PREFIX) else name,
                    color=colors[column], alpha=0.85)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_xlim(left=max(0.0, min(100 * t[c]["auroc"] for t in table for c in columns) - 5))
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([t["method"] for t in table], fontsize=9)
    axes[0].set_ylim(-0.6, n - 0.4)
    handles, labels = axes[1].get_legend_handles_labels()
    inches = fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.45 / inches, 1, 1))  # room at the bottom for the legend
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
