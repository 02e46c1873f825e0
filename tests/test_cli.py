"""The command line: bad input gives one line naming the culprit and exit status 1, never a traceback."""

import os
import subprocess
import sys

import pytest
import yaml

from featcache.cli import main
from tests.conftest import REPO, write_pipeline


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_pipeline_file(tmp_path, capsys):
    code, _, err = run_cli(["extract", tmp_path / "nope.yaml"], capsys)
    assert_one_line_error(code, err, "nope.yaml", "no such file")


def test_unknown_dataset_name(tmp_path, capsys):
    pipeline = write_pipeline(tmp_path, checkpoint="random")
    spec = yaml.safe_load(pipeline.read_text())
    spec["splits"][3] = "leters"
    pipeline.write_text(yaml.safe_dump(spec))
    code, _, err = run_cli(["extract", pipeline], capsys)
    assert_one_line_error(code, err, "'leters'", "did you mean 'letters'")


def test_manifest_path_that_does_not_exist(tmp_path, capsys):
    pipeline = write_pipeline(tmp_path, checkpoint="random", overrides={"manifest": str(tmp_path / "missing.yaml")})
    code, _, err = run_cli(["extract", pipeline], capsys)
    assert_one_line_error(code, err, "missing.yaml")


def test_unwritable_output(tmp_path, capsys):
    if os.geteuid() == 0:
        target = "/proc/featcache/out.h5"  # not creatable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out.h5"
    pipeline = write_pipeline(tmp_path, checkpoint="random")
    code, _, err = run_cli(["extract", pipeline, "--out", target], capsys)
    assert_one_line_error(code, err, str(os.path.dirname(target)))


def test_existing_output_without_overwrite_is_kept(tmp_path, capsys):
    pipeline = write_pipeline(tmp_path, checkpoint="random")
    existing = tmp_path / "digits.h5"
    existing.write_bytes(b"a user's file")
    code, _, err = run_cli(["extract", pipeline], capsys)
    assert_one_line_error(code, err, "digits.h5", "--overwrite")
    assert existing.read_bytes() == b"a user's file"


def test_malformed_yaml_names_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsplits: [a, b\ncache: c.h5\n")
    code, _, err = run_cli(["extract", bad], capsys)
    assert_one_line_error(code, err, "bad.yaml", "line")


def test_cache_path_with_wrong_suffix(tmp_path, capsys):
    pipeline = write_pipeline(tmp_path, checkpoint="random")
    code, _, err = run_cli(["extract", pipeline, "--out", tmp_path / "x.npz"], capsys)
    assert_one_line_error(code, err, "x.npz", ".h5", ".zarr")


def test_info_prints_roles_shapes_and_provenance(random_digits, capsys):
    main(["info", str(random_digits["h5"])])  # returns normally on success
    out = capsys.readouterr().out
    for text in ("fingerprint", "checkpoint_sha256", "feature_layer", "prepool_layer", "role=id_test",
                 "role=pseudo_ood", "corruption=", "complete", "(450, 64)", "float32", "int64"):
        assert text in out, text


def test_info_on_a_file_that_is_not_a_cache(tmp_path, capsys):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    code, _, err = run_cli(["info", junk], capsys)
    assert_one_line_error(code, err, "junk.h5")


def test_featcache_entry_point_runs_as_a_process():
    missing = "/nonexistent/x.h5"
    result = subprocess.run([sys.executable, "-m", "featcache.cli", "info", missing],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and missing in result.stderr
