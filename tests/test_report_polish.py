"""Issue 15, parts 5-8: terminal tables that never cut a value, provenance in every output, the next
step in every "missing" error, and the report's figures (labels, marks, the tie rule, the overview)."""

import base64
import json
import pickle
import shutil

import h5py
import pytest
import yaml

import featcache
from featcache.cli import main

# A configuration with many parameters and long values: before issue 15 the terminal cut it to 19
# characters and reformatted it (`rg_add alpha_scale=0.5,k=0` for k 0.5, seed hidden).
LONG = {"alpha_scale": 0.5, "bank": "id_train_with_a_long_name", "eps": 1.0, "form": "paper", "k": 0.5,
        "percentile_of": "id_train", "seed": 12345, "T": 1.0, "w": 0.6171875}
LONG_PARAMS = json.dumps(LONG, sort_keys=True)


def items_of(params: str) -> list[str]:
    """Each `"key": value` of a params JSON object, written out by json itself."""
    return [json.dumps({k: v})[1:-1] for k, v in json.loads(params).items()]


def columns_of(rule: str) -> list[tuple[int, int]]:
    """(start, end) of each run of dashes in a table's rule line: the columns' extents."""
    spans, start = [], None
    for i, char in enumerate(rule + " "):
        if char == "-" and start is None:
            start = i
        elif char != "-" and start is not None:
            spans.append((start, i))
            start = None
    return spans


def check_aligned(text: str, right: set[int], row_key: int) -> list[list[str]]:
    """Check the table in `text` (header, rule of dashes, rows) is aligned; return its rows, each a
    list of cells, a cell's lines joined (a wrapped params cell is joined back with "").

    Aligned: no line is longer than the rule; between two columns every line is blank; on a row's
    first line, a left-aligned cell starts at its column's start and a right-aligned one ends at its
    column's end. A row starts at each line whose column `row_key` is not blank.
    """
    lines = text.splitlines()
    rule_at = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "} and "-" in line)
    spans = columns_of(lines[rule_at])
    rows = []
    for line in lines[rule_at + 1:]:
        assert len(line) <= spans[-1][1], line
        padded = line.ljust(spans[-1][1])
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert padded[end:start].strip() == "", (line, end, start)
        parts = [padded[a:b] for a, b in spans]
        if parts[row_key].strip():
            for i, (part, (a, b)) in enumerate(zip(parts, spans)):
                if part.strip():
                    assert (part[-1] != " ") if i in right else (part[0] != " "), (line, i)
            rows.append([[p] for p in parts])
        else:
            for cell, part in zip(rows[-1], parts):
                cell.append(part)
    return [["".join(p.rstrip() for p in cell).strip() for cell in row] for row in rows]


def sweep_rows(params_list, groups=("near", "far")):
    rows = []
    for i, (method, params) in enumerate(params_list):
        for ood in ["a", "b"] + [f"group:{g}" for g in groups] + ["mean"]:
            rows.append({"method": method, "params": params, "ood": ood, "fpr95": 0.1 + 0.01 * i,
                         "auroc": 0.9 - 0.01 * i, "aupr_in": 0.8, "aupr_out": 0.7, "id_acc": 0.95})
    return rows


def test_sweep_table_shows_every_param_verbatim_and_keeps_columns_aligned():
    from featcache.tables import format_table

    configs = [("rg_add", LONG_PARAMS), ("msp", "{}"), ("react", '{"percentile": 90, "percentile_of": "id_train"}')]
    text = format_table(sweep_rows(configs))
    for item in items_of(LONG_PARAMS):
        assert item in text, item  # each "key": value whole on one line: nothing cut or rewritten
    assert any(len(line) < len(LONG_PARAMS) for line in text.splitlines() if '"seed"' in line)  # wrapped
    header = text.splitlines()[0].split()
    rows = check_aligned(text, right=set(range(1, 8)), row_key=0)
    assert [r[0] for r in rows] == ["rg_add", "msp", "react"]  # by FPR95
    assert {r[0]: r[-1] for r in rows} == {m: p for m, p in configs}  # params joined back: the CSV's text
    assert header[-1] == "params"
    assert rows[0][1] == "10.00" and rows[0][6] == "10.00 / 90.00"  # FPR95 and near FPR95/AUROC, percent


def test_selection_table_shows_every_param_verbatim_and_keeps_columns_aligned():
    from featcache.select import format_selection

    rows = []
    for choice, params in (("selected", LONG_PARAMS), ("oracle", '{"k": 0.7, "seed": 0}')):
        rows.append({"method": "rg_add", "choice": choice, "params": params, "ood": "mean", "fpr95": 0.25,
                     "auroc": 0.875, "aupr_in": 0, "aupr_out": 0, "id_acc": 0, "selection_auroc": ""})
    text = format_selection(rows, "cifar10")
    for item in items_of(LONG_PARAMS) + ['"k": 0.7', '"seed": 0']:
        assert item in text, item
    table = check_aligned(text, right={2, 3}, row_key=1)
    assert [r[1] for r in table] == ["selected on pseudo-OOD", "paper default", "ORACLE: best on test OOD"]
    assert table[0][2:] == ["25.00", "87.50", LONG_PARAMS]
    assert table[1][4] == "none for cifar10"
    assert table[2][4] == '{"k": 0.7, "seed": 0}'


def test_compare_table_shows_every_param_verbatim_and_keeps_columns_aligned():
    from featcache.report import format_compare

    rows = [{"method": "rg_add", "params": LONG_PARAMS, "fpr95_a": 0.5, "auroc_a": 0.75, "fpr95_b": 0.25,
             "auroc_b": 0.875, "fpr95_diff": -0.25, "auroc_diff": 0.125},
            {"method": "msp", "params": "{}", "fpr95_a": 0.5, "auroc_a": 0.5, "fpr95_b": 0.5, "auroc_b": 0.5,
             "fpr95_diff": 0.0, "auroc_diff": 0.0}]
    text = format_compare(rows, "A.csv", "B.csv")
    table = check_aligned(text, right=set(range(1, 7)), row_key=0)
    assert table[0] == ["rg_add", "50.00", "25.00", "-25.00", "75.00", "87.50", "+12.50", LONG_PARAMS]
    assert table[1][-1] == "{}"


def test_wrapping_never_breaks_inside_a_list_or_a_string():
    from featcache.tables import wrap_params

    text = json.dumps({"a": [1, 2, 3, 4, 5, 6, 7, 8], "b": "x, y, z", "c": 1, "d": {"e": 1, "f": 2}})
    lines = wrap_params(text, width=10)
    assert "".join(lines) == text
    assert lines == ['{"a": [1, 2, 3, 4, 5, 6, 7, 8],', ' "b": "x, y, z",', ' "c": 1,', ' "d": {"e": 1, "f": 2}}']


# ---- the tie rule -------------------------------------------------------------------------------------

def test_tie_rule_bolds_the_best_only_when_not_every_method_has_it():
    from featcache.report import bold_flags, to_markdown

    assert bold_flags(["10.00", "10.00", "10.00"], "fpr95") == [False, False, False]  # all tie: none
    assert bold_flags(["12.00", "10.00", "11.00"], "fpr95") == [False, True, False]  # unique best
    assert bold_flags(["10.00", "10.00", "11.00"], "fpr95") == [True, True, False]  # some tie
    assert bold_flags(["90.00", "95.00", "95.00"], "auroc") == [False, True, True]
    assert bold_flags(["50.00"], "auroc") == [False]  # one method: nothing to single out

    def entry(method, fpr_a, auroc_a, fpr_mean):
        return {"method": method, "params": "{}", "a": {"fpr95": fpr_a, "auroc": auroc_a},
                "mean": {"fpr95": fpr_mean, "auroc": 0.5}}

    md = to_markdown([entry("x", 0.1, 0.9, 0.3), entry("y", 0.2, 0.9, 0.3)], ["a"], "label")
    x, y = [line.split(" | ") for line in md.splitlines() if line.startswith("| x") or line.startswith("| y")]
    # columns: method, params, a FPR95, a AUROC (all tie), mean FPR95 (all tie), mean AUROC (all tie)
    assert x[2] == "**10.00**" and y[2] == "20.00"
    assert [c.strip(" |") for c in x[3:]] == ["90.00", "30.00", "50.00"]
    assert [c.strip(" |") for c in y[3:]] == ["90.00", "30.00", "50.00"]


# ---- figures --------------------------------------------------------------------------------------------

@pytest.fixture
def kept_figures(monkeypatch):
    """The matplotlib figures the plots module closes, kept open for inspection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plt.close(fig)


def test_histograms_have_a_y_label_and_the_tpr95_line_is_in_the_legend(tmp_path, kept_figures, rng):
    from featcache.plots import scores_figure

    scores_figure("msp", {"T": 1}, rng.normal(1, 1, 300), {"a": rng.normal(0, 1, 200), "b": rng.normal(-1, 1, 200)},
                  tmp_path / "s.png")
    fig, = kept_figures
    hist_axes, roc = fig.axes[:-1], fig.axes[-1]
    assert len(hist_axes) == 2
    for ax in hist_axes:
        assert "density" in ax.get_ylabel()
    line95 = [line for line in roc.get_lines() if list(line.get_ydata()) == [0.95, 0.95]]
    assert len(line95) == 1
    assert line95[0].get_label() in [t.get_text() for t in roc.get_legend().get_texts()]
    assert "TPR 0.95" in line95[0].get_label()


def test_sensitivity_figure_marks_the_selected_configuration(tmp_path, kept_figures):
    from featcache.plots import sensitivity_figure

    rows = []
    for w in (0.2, 0.4, 0.8):
        for ood, shift in (("a", 0.0), ("b", 0.1), ("mean", 0.05)):
            rows.append({"method": "nap+msp", "params": json.dumps({"eps": 1.0, "w": w}), "ood": ood,
                         "fpr95": 0.3 + shift - w / 10, "auroc": 0.8 + w / 10})
    selected = {"params": json.dumps({"eps": 1.0, "w": 0.6171875}), "fpr95": 0.4375, "auroc": 0.875}
    sensitivity_figure("nap+msp", rows, tmp_path / "x.png", selected)
    fig, = kept_figures
    for ax, metric in zip(fig.axes[:2], ("fpr95", "auroc")):
        stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
        assert len(stars) == 1  # not a grid point: w came from the binary search
        assert list(stars[0].get_xdata()) == [0.6171875]
        assert list(stars[0].get_ydata()) == [100 * selected[metric]]
        assert any(list(line.get_xdata()) == [0.6171875, 0.6171875] for line in ax.get_lines())  # the vertical line
    assert any("selected" in t.get_text() for t in fig.axes[1].get_legend().get_texts())


# ---- on the digits pipeline: provenance, overview, next steps ------------------------------------------

GRID = {"energy": {"T": [1, 2]}, "rg_add": {"k": [0.5, 1.0], "alpha_scale": [0.5]}, "msp": {}}


@pytest.fixture(scope="module")
def polished(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("polish")
    pipeline = tmp / "pol.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "pol", "cache": str(digits["cache"]), "results": str(tmp / "res"),
                                        "sweep": GRID, "benchmark": "cifar10"}))
    return {"tmp": tmp, "pipeline": pipeline, "results": tmp / "res" / "pol", "cache": digits["cache"]}


def expected_provenance(cache_path):
    with h5py.File(cache_path, "r") as fh:  # straight from the file, not through featcache
        attrs = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in fh.attrs.items()}
    return {"fingerprint": attrs["fingerprint"], "backbone": attrs["backbone"],
            "checkpoint_sha256": attrs["checkpoint_sha256"]}


def test_provenance_in_meta_files_terminal_table_md_and_html(polished, capsys):
    expected = expected_provenance(polished["cache"])
    assert len(expected["checkpoint_sha256"]) == 64 and expected["backbone"] == "digits_resnet"
    shown = [expected["fingerprint"][:12], expected["backbone"], expected["checkpoint_sha256"][:12],
             featcache.__version__, "pol"]
    main(["sweep", str(polished["pipeline"]), "--quiet"])
    main(["select", str(polished["pipeline"]), "--quiet"])
    terminal = capsys.readouterr().out
    for name in ("sweep", "selection"):
        meta = json.loads((polished["results"] / f"{name}.meta.json").read_text())
        assert {k: meta[k] for k in expected} == expected
        assert meta["pipeline"] == "pol" and meta["featcache_version"] == featcache.__version__
        assert meta["written_utc"].endswith("+00:00")
        line = next(x for x in terminal.splitlines() if x.startswith(f"{name}.csv: "))
        for text in shown + [meta["written_utc"]]:
            assert text in line, (text, line)
        assert expected["fingerprint"][:13] not in line  # short, as the issue asks
    main(["report", str(polished["pipeline"])])
    printed = capsys.readouterr().out
    md = (polished["results"] / "table.md").read_text()
    page = (polished["results"] / "report.html").read_text()
    for text in shown:
        assert text in md and text in page and text in printed, text


def test_overview_figure_is_in_the_report(polished, capsys):
    if not (polished["results"] / "report.html").exists():
        main(["sweep", str(polished["pipeline"]), "--quiet"])
        main(["select", str(polished["pipeline"]), "--quiet"])
        main(["report", str(polished["pipeline"])])
    overview = polished["results"] / "figures" / "overview.png"
    data = overview.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    page = (polished["results"] / "report.html").read_text()
    assert base64.b64encode(data).decode("ascii") in page
    assert "Overview" in page
    assert "unless every method ties" in page


def test_report_says_when_meta_files_are_missing(polished, tmp_path, capsys):
    results = tmp_path / "res" / "old"
    results.mkdir(parents=True)
    if not (polished["results"] / "sweep.csv").exists():
        main(["sweep", str(polished["pipeline"]), "--quiet"])
    shutil.copy(polished["results"] / "sweep.csv", results / "sweep.csv")  # no sweep.meta.json beside it
    pipeline = tmp_path / "old.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "old", "cache": str(polished["cache"]), "results": str(tmp_path / "res"),
                                        "sweep": GRID}))
    main(["report", str(pipeline), "--no-figures"])
    printed = capsys.readouterr().out
    fingerprint = expected_provenance(polished["cache"])["fingerprint"][:12]
    for text in (printed, (results / "table.md").read_text(), (results / "report.html").read_text()):
        assert "provenance unknown: no sweep.meta.json" in text
        assert fingerprint not in text and "digits_resnet" not in text  # nothing invented


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 1 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_missing_cache_names_the_extract_command(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "cache": str(tmp_path / "none.h5"),
                                        "results": str(tmp_path / "res"), "sweep": {"msp": {}}}))
    for command in ("sweep", "select"):
        line = run_cli([command, pipeline], capsys)
        assert "none.h5: no such cache file" in line and f"run `featcache extract {pipeline}` first" in line, line
    line = run_cli(["sweep", pipeline, "--cache", tmp_path / "other.zarr"], capsys)
    assert f"run `featcache extract {pipeline} --out {tmp_path / 'other.zarr'}` first" in line, line
    for args in (["info", tmp_path / "x.h5"], ["upgrade", tmp_path / "x.h5"], ["convert", tmp_path / "x.h5", tmp_path / "y.zarr"]):
        assert "x.h5: no such cache file; run `featcache extract PIPELINE` first" in run_cli(args, capsys)
    line = run_cli(["merge", tmp_path / "m.h5", tmp_path / "s0.h5", tmp_path / "s1.h5"], capsys)
    assert "s0.h5: no such cache file; run `featcache extract PIPELINE --shard I/N` first" in line, line


def test_report_without_a_cache_names_the_extract_command(polished, tmp_path, capsys):
    if not (polished["results"] / "sweep.csv").exists():
        main(["sweep", str(polished["pipeline"]), "--quiet"])
    results = tmp_path / "res" / "q"
    shutil.copytree(polished["results"], results)
    pipeline = tmp_path / "q.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "q", "cache": str(tmp_path / "gone.h5"), "results": str(tmp_path / "res"),
                                        "sweep": GRID}))
    line = run_cli(["report", pipeline], capsys)
    assert f"gone.h5: no such cache file; run `featcache extract {pipeline}` first" in line, line


def test_missing_results_name_the_sweep_and_select_commands(digits, tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "cache": str(digits["cache"]), "results": str(tmp_path / "res"),
                                        "sweep": {"msp": {}}}))
    line = run_cli(["report", pipeline], capsys)
    assert "no sweep.csv or selection.csv" in line and f"run `featcache sweep {pipeline}` first" in line, line
    line = run_cli(["compare", tmp_path / "res" / "p", tmp_path / "res" / "q"], capsys)
    assert "no such results file; run `featcache sweep PIPELINE` first" in line, line
    line = run_cli(["compare", tmp_path / "res" / "p" / "selection.csv", tmp_path / "b.csv"], capsys)
    assert "selection.csv: no such results file; run `featcache select PIPELINE` first" in line, line


def test_incomplete_cache_names_extract_to_resume_it(digits, tmp_path, capsys):
    copy = tmp_path / "half.h5"
    shutil.copy(digits["cache"], copy)
    with h5py.File(copy, "r+") as fh:
        fh["splits/letters"].attrs["complete"] = False
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "p", "cache": str(digits["cache"]), "results": str(tmp_path / "res"),
                                        "sweep": {"msp": {}}}))
    line = run_cli(["sweep", pipeline, "--cache", copy], capsys)
    assert "'letters' is incomplete" in line and f"run `featcache extract {pipeline} --out {copy}` again to resume it" in line


def test_next_step_survives_a_worker_boundary():
    from featcache.errors import NextStep, missing_cache

    exc = pickle.loads(pickle.dumps(missing_cache("/x/c.h5")))
    assert isinstance(exc, NextStep) and str(exc) == "/x/c.h5: no such cache file; run `featcache extract PIPELINE` first"
    assert str(exc.for_pipeline("p.yaml")) == "/x/c.h5: no such cache file; run `featcache extract p.yaml` first"
