"""The report: every figure a valid PNG of a sensible size, HTML tables equal to the CSVs; compare."""

import csv
import re
import struct

import pytest
import yaml

from featcache.cli import main

GRID = {"energy": {"T": [1, 2]}, "ash_s": {"p": [70, 90]}, "react": {"percentile": [85, 95]},
        "rg": {"k": [0.5, 1.0], "T": [1, 2]}, "nap+msp": {"w": [0.3, 0.7]}, "msp": {}}


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def reported(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    pipeline = tmp / "r.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "r", "cache": str(digits["cache"]), "results": str(tmp / "res"),
                                        "sweep": GRID, "benchmark": "imagenet"}))  # a paper setting for each
    main(["sweep", str(pipeline), "--quiet"])
    main(["select", str(pipeline), "--quiet"])
    main(["report", str(pipeline)])
    return tmp / "res" / "r"


def test_every_figure_is_a_sensible_png(reported):
    figures = sorted((reported / "figures").glob("*.png"))
    names = {f.name for f in figures}
    for method in GRID:
        safe = method.replace("+", "_plus_")
        assert f"scores_{safe}.png" in names
        if GRID[method]:
            assert f"sensitivity_{safe}.png" in names
    for figure in figures:
        width, height = png_size(figure)
        assert 300 <= width <= 4000 and 200 <= height <= 3000, (figure, width, height)
        assert figure.stat().st_size > 10_000


def test_html_is_self_contained_and_its_numbers_equal_the_csv(reported):
    page = (reported / "report.html").read_text()
    assert "<img" in page and "src='http" not in page and page.count("data:image/png;base64,") >= len(GRID)
    tables = re.findall(r"<table>(.*?)</table>", page, re.S)
    assert len(tables) == 2  # results per ood split, then selection

    def parse(table):
        header = re.findall(r"<th[^>]*>(.*?)</th>", table)
        rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
        return header, rows

    import html

    header, rows = parse(tables[0])
    with open(reported / "selection.csv", newline="") as fh:
        selection = list(csv.DictReader(fh))
    selected = {(r["method"], r["ood"]): r for r in selection if r["choice"] == "selected"}
    for row in rows:
        method, params = row[0], html.unescape(row[1])
        for column, value in zip(header[2:], row[2:]):
            ood, metric = column.rsplit(" ", 1)
            ref = selected[(method, ood)]
            assert html.unescape(ref["params"]) == params
            assert float(value) == pytest.approx(100 * float(ref[metric.lower()]), abs=0.005001)
    header, rows = parse(tables[1])
    for row in rows:
        for choice, offset in (("selected", 1), ("paper_default", 4), ("oracle", 7)):
            ref = next(r for r in selection if (r["method"], r["choice"], r["ood"]) == (row[0], choice, "mean"))
            assert float(row[offset + 1]) == pytest.approx(100 * float(ref["fpr95"]), abs=0.005001)
            assert float(row[offset + 2]) == pytest.approx(100 * float(ref["auroc"]), abs=0.005001)


def test_compare_refuses_different_grids(reported, digits, tmp_path, capsys):
    other = tmp_path / "o.yaml"
    grid = dict(GRID, ash_s={"p": [70, 95]})
    other.write_text(yaml.safe_dump({"name": "o", "cache": str(digits["cache"]), "results": str(tmp_path), "sweep": grid}))
    main(["sweep", str(other), "--quiet"])
    capsys.readouterr()
    main(["compare", str(reported), str(reported / "sweep.csv")])
    out = capsys.readouterr().out
    assert "+0.00" in out and "-" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(reported), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "grids differ" in err and "ash_s" in err
    main(["compare", str(reported), str(tmp_path / "o"), "--partial"])
    assert '{"p": 95}' not in capsys.readouterr().out
