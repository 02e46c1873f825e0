"""Detector plugins: a method written outside featcache (tests/plugins/featnorm.py, score -||x||_p),
found through a pipeline's `plugins:` field or an installed package's entry point, swept in worker
processes (loky, dask) and checked against scores and metrics computed here from the raw cache."""

import csv
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from featcache.cli import main
from featcache.errors import FeatcacheError
from tests.conftest import REPO

PLUGIN = REPO / "tests" / "plugins" / "featnorm.py"
GRID = {"featnorm": {"p": [1, 2, 3]}, "energy": {}}


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test starts from the built-ins and leaves them so: plugins loaded in this process are
    forgotten afterwards (the registry, and the modules that registered into it)."""
    from featcache import plugins
    from featcache.methods import REGISTRY

    saved, modules = dict(REGISTRY), set(sys.modules)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)
    plugins._LOADED.clear()
    for name in set(sys.modules) - modules:
        if name.startswith(("featcache_plugin_", "userfeat", "fakefeat")):
            del sys.modules[name]


def env_with(*paths):
    """This checkout first on the subprocess's path (the venv also has an editable featcache)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(REPO), env.get("PYTHONPATH", "")])
    return env


def run(args, cwd, *paths):
    return subprocess.run([sys.executable, "-m", "featcache.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env_with(*paths), timeout=600)


def write_pipeline(tmp_path, cache, grid, plugins=None, **extra):
    spec = {"name": "plug", "cache": str(cache), "results": str(tmp_path / "res"), "sweep": grid, **extra}
    if plugins is not None:
        spec["plugins"] = plugins
    path = tmp_path / "pipes" / "plug.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def raw_splits(cache):
    """{name: (role, features, logits, labels)} straight from the HDF5 file."""
    out = {}
    with h5py.File(cache, "r") as fh:
        for name, group in fh["splits"].items():
            role = group.attrs["role"]
            role = role.decode() if isinstance(role, bytes) else str(role)
            out[name] = (role, group["features"][...], group["logits"][...], group["labels"][...])
    return out


def check_featnorm_rows(rows, cache, ps):
    """Every featnorm row against -||x||_p computed here, sklearn's AUROC and the reference FPR95."""
    splits = raw_splits(cache)
    (id_name,) = [n for n, s in splits.items() if s[0] == "id_test"]
    oods = sorted(n for n, s in splits.items() if s[0] == "ood")
    _, id_x, id_logits, id_labels = splits[id_name]
    checked = 0
    for p in ps:
        def score(x):
            return -np.sum(np.abs(x.astype(np.float64)) ** p, axis=1) ** (1 / p)

        id_s = score(id_x)
        mine = [r for r in rows if r["method"] == "featnorm" and json.loads(r["params"]) == {"p": p}]
        assert mine, p
        for ood in oods:
            ood_s = score(splits[ood][1])
            (row,) = [r for r in mine if r["ood"] == ood]
            y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
            assert float(row["auroc"]) == pytest.approx(roc_auc_score(y, np.r_[id_s, ood_s]), abs=1e-9)
            threshold = np.sort(id_s)[round(0.05 * len(id_s))]  # ReAct/ASH get_curve
            assert float(row["fpr95"]) == pytest.approx(np.mean(ood_s > threshold), abs=1e-9)
            assert float(row["id_acc"]) == pytest.approx(np.mean(id_logits.argmax(axis=1) == id_labels))
            checked += 1
    assert checked == len(ps) * len(oods) >= 3


def test_plugin_file_swept_with_two_jobs_matches_brute_force(random_digits, tmp_path):
    """The issue's failure: a custom method under --jobs 2 was 'unknown' in the workers. The plugin is
    named relative to the pipeline's folder, and the command runs from another directory."""
    shutil.copy(PLUGIN, tmp_path / "pipes_featnorm.py")
    (tmp_path / "pipes" / "mine").mkdir(parents=True)
    shutil.copy(PLUGIN, tmp_path / "pipes" / "mine" / "featnorm.py")
    pipeline = write_pipeline(tmp_path, random_digits["h5"], GRID, plugins=["mine/featnorm.py"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run(["sweep", pipeline, "--jobs", "2", "--quiet"], elsewhere)
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "res" / "plug" / "sweep.csv")
    check_featnorm_rows(rows, random_digits["h5"], [1, 2, 3])
    assert {r["method"] for r in rows} == {"featnorm", "energy"}

    listed = run(["methods", "--pipeline", pipeline], elsewhere)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("featnorm "))
    assert "p=2.0" in lines[at] and "cifar10: p=2.0" in lines[at + 1]
    assert lines[at + 2].strip() == "from plugin: mine/featnorm.py"
    assert "featnorm" not in run(["methods"], elsewhere).stdout  # only with its pipeline


def test_plugin_serial_equals_two_jobs_equals_dask(random_digits, tmp_path):
    pytest.importorskip("dask.distributed")
    from dask.distributed import LocalCluster

    from featcache.sweep import run_sweep

    grid = {"featnorm": {"p": [1, 2]}, "nap+featnorm": {"w": [0.3], "p": [2]}, "msp": {}}
    out = {kind: tmp_path / kind / "sweep.csv" for kind in ("serial", "jobs", "dask")}
    run_sweep(grid, random_digits["h5"], out["serial"], progress=False, plugins=[str(PLUGIN)])
    run_sweep(grid, random_digits["h5"], out["jobs"], jobs=2, progress=False, plugins=[str(PLUGIN)])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        run_sweep(grid, random_digits["h5"], out["dask"], progress=False, backend="dask",
                  scheduler=cluster.scheduler_address, plugins=[str(PLUGIN)])
    serial = out["serial"].read_text()
    assert serial == out["jobs"].read_text() == out["dask"].read_text()
    check_featnorm_rows(read_rows(out["serial"]), random_digits["h5"], [1, 2])
    assert any(r["method"] == "nap+featnorm" for r in read_rows(out["serial"]))


def test_plugin_module_of_a_package_in_the_working_directory(random_digits, tmp_path):
    """`plugins: [package.module]`: imported like backbone.factory's modules, the directory the
    command runs in first on the path, in the workers too."""
    work = tmp_path / "work"
    (work / "mydetectors").mkdir(parents=True)
    (work / "mydetectors" / "__init__.py").write_text("")
    shutil.copy(PLUGIN, work / "mydetectors" / "norms.py")
    pipeline = write_pipeline(tmp_path, random_digits["h5"], {"featnorm": {"p": [2]}}, plugins=["mydetectors.norms"])
    result = run(["sweep", pipeline, "--jobs", "2", "--quiet"], work)
    assert result.returncode == 0, result.stderr
    check_featnorm_rows(read_rows(tmp_path / "res" / "plug" / "sweep.csv"), random_digits["h5"], [2])
    assert "from plugin: mydetectors.norms" in run(["methods", "--pipeline", pipeline], work).stdout


def test_entry_point_plugin_of_an_installed_package(random_digits, tmp_path):
    """A package installed with `[project.entry-points."featcache.methods"]`: a dist-info folder on
    the path is what pip leaves; no `plugins:` field is needed."""
    site = tmp_path / "site"
    (site / "fakefeat-0.1.dist-info").mkdir(parents=True)
    (site / "fakefeat-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakefeat\nVersion: 0.1\n")
    (site / "fakefeat-0.1.dist-info" / "entry_points.txt").write_text(
        "[featcache.methods]\nfeatnorm = fakefeat_methods\n")
    shutil.copy(PLUGIN, site / "fakefeat_methods.py")
    pipeline = write_pipeline(tmp_path, random_digits["h5"], {"featnorm": {"p": [2, 3]}})
    listed = run(["methods"], tmp_path, site)
    assert listed.returncode == 0, listed.stderr
    assert "from entry point: fakefeat_methods" in listed.stdout
    result = run(["sweep", pipeline, "--jobs", "2", "--quiet"], tmp_path, site)
    assert result.returncode == 0, result.stderr
    check_featnorm_rows(read_rows(tmp_path / "res" / "plug" / "sweep.csv"), random_digits["h5"], [2, 3])

    (site / "fakefeat_methods.py").write_text("raise ImportError('needs libfoo')\n")
    broken = run(["methods"], tmp_path, site)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines() == [
        "featcache: error: entry point 'featnorm' of fakefeat (group featcache.methods): importing fakefeat_methods "
        "failed: ImportError: needs libfoo"]


BAD = {
    "raises.py": "raise RuntimeError('cannot find libfoo\\nsecond line')\n",
    "syntax.py": "def broken(:\n",
    "energy.py": "import featcache\n@featcache.register('energy')\ndef f(data, head, fit):\n    pass\n",
    "again.py": "import featcache\n@featcache.register('featnorm')\ndef f(data, head, fit):\n    pass\n",
}


@pytest.mark.parametrize("plugins, fragments", [
    (["missing.py"], ["plug.yaml: plugin 'missing.py': file ", "missing.py not found"]),
    (["no_such_package.detectors"], ["plug.yaml: plugin 'no_such_package.detectors': no module named "
                                     "'no_such_package.detectors'"]),
    (["raises.py"], ["plug.yaml: plugin 'raises.py': importing it failed: RuntimeError: cannot find libfoo"]),
    (["syntax.py"], ["plug.yaml: plugin 'syntax.py': importing it failed: SyntaxError"]),
    (["energy.py"], ["plug.yaml: plugin 'energy.py': method 'energy' is registered twice: by featcache "
                     "(built-in) and by plugin: energy.py"]),
    ([str(PLUGIN), "again.py"], ["plug.yaml: plugin 'again.py': method 'featnorm' is registered twice: by plugin: "
                                 f"{PLUGIN} and by plugin: again.py"]),
    ("featnorm.py", ["plug.yaml: plugins: must be a list"]),
    (["docs/notes.txt"], ["plug.yaml: plugins: plugin 'docs/notes.txt': a plugin file must end in .py"]),
])
def test_bad_plugin_is_one_line_naming_pipeline_and_plugin(random_digits, tmp_path, capsys, plugins, fragments):
    pipeline = write_pipeline(tmp_path, random_digits["h5"], {"energy": {}}, plugins=plugins)
    for name, text in BAD.items():
        (pipeline.parent / name).write_text(text)
    for command in (["sweep", pipeline, "--quiet"], ["methods", "--pipeline", pipeline]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in command])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        for fragment in fragments:
            assert fragment in err, (fragment, err)
    assert not (tmp_path / "res" / "plug" / "sweep.csv").exists()


def test_loading_a_plugin_twice_is_harmless(tmp_path):
    from featcache.methods import get_method
    from featcache.plugins import load_plugins

    shutil.copy(PLUGIN, tmp_path / "featnorm.py")
    first = load_plugins(["featnorm.py"], base_dir=tmp_path)
    method = get_method("featnorm")
    assert first == [str((tmp_path / "featnorm.py").resolve())]
    assert load_plugins([str(tmp_path / "featnorm.py"), "featnorm.py"], base_dir=tmp_path) == first
    assert get_method("featnorm") is method and method.origin == "plugin: featnorm.py"
    assert method.plugin == first[0] and method.version.startswith("1+")  # + a digest of its source
    # another file registering the same name is a clash, which leaves the registry as it was
    (tmp_path / "copy.py").write_text(PLUGIN.read_text())
    with pytest.raises(FeatcacheError, match="plugin 'copy.py': method 'featnorm' is registered twice: by plugin: "
                                             "featnorm.py and by plugin: copy.py"):
        load_plugins(["copy.py"], base_dir=tmp_path)
    assert get_method("featnorm") is method
    # the file edited (in a notebook session) is loaded anew and replaces its own method
    path = tmp_path / "featnorm.py"
    path.write_text(path.read_text().replace("version=1", "version=2"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    load_plugins(["featnorm.py"], base_dir=tmp_path)
    assert get_method("featnorm").version.startswith("2+")


def test_a_reused_worker_holds_only_the_current_sweeps_plugins(tmp_path):
    """loky keeps its workers between sweeps: a worker that imported plugin a for one sweep imports
    plugin b, registering the same name, for the next without a clash, and a again after that."""
    from featcache.methods import REGISTRY, get_method
    from featcache.plugins import import_in_worker

    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text(
            f"import featcache\n@featcache.register('mine', version='{name}')\ndef mine(data, head, fit):\n"
            "    pass\n")
    a, b = str(tmp_path / "a.py"), str(tmp_path / "b.py")
    import_in_worker([a])
    assert get_method("mine").version.startswith("a+")
    import_in_worker([b])
    assert get_method("mine").version.startswith("b+")
    import_in_worker([a])
    assert get_method("mine").version.startswith("a+")
    import_in_worker([])
    assert "mine" not in REGISTRY
    with pytest.raises(FeatcacheError, match="method 'mine' is registered twice"):
        import_in_worker([a, b])  # one sweep naming both is a clash, as in the parent


def test_register_like_a_builtin(tmp_path):
    """featcache.register takes a built-in's keywords: defaults, paper settings, integer checks,
    version; nap+<plugin> is built from it as for a built-in."""
    import featcache
    from featcache.methods import Output, get_method

    @featcache.register("topk_norm", defaults={"k": 3, "scale": 1.0}, integer=("k",),
                        paper={"cifar10": {"k": 5, "scale": 1.0}}, version="2")
    def topk_norm(data, head, fit, k, scale):
        top = np.sort(np.abs(data.features), axis=1)[:, -k:]
        return Output(-scale * top.sum(axis=1), data.logits.argmax(axis=1))

    method = get_method("topk_norm")
    assert method.resolve({"k": 4}) == {"k": 4, "scale": 1.0}
    assert method.paper_default("cifar10") == {"k": 5, "scale": 1.0} and method.paper_default("imagenet") is None
    assert method.version.startswith("2+") and method.origin.startswith("module: ") and method.origin.endswith("test_plugins")
    with pytest.raises(FeatcacheError, match="k must be a positive integer"):
        method.resolve({"k": 1.5})
    with pytest.raises(FeatcacheError, match="unknown parameter 'kk'; did you mean 'k'"):
        method.resolve({"kk": 2})
    combined = get_method("nap+topk_norm")
    assert combined.resolve({"w": 0.4}) == {"w": 0.4, "eps": 1.0, "form": "paper", "k": 3, "scale": 1.0}
    assert combined.origin == method.origin and "topk_norm2" in combined.version
    with pytest.raises(FeatcacheError, match="w must be"):
        combined.resolve({"w": 2})
    with pytest.raises(FeatcacheError, match="unknown benchmark 'cifar11'"):
        featcache.register("other", paper={"cifar11": {}})(topk_norm)
    with pytest.raises(FeatcacheError, match="not start with 'nap\\+'"):
        featcache.register("nap+x")


def test_a_plugin_parameter_named_like_nap_s_has_no_nap_form(capsys):
    import featcache
    from featcache.methods import Output, get_method

    @featcache.register("weighted", defaults={"w": 2.0})  # w > 1: a plugin's parameters are its own
    def weighted(data, head, fit, w):
        return Output(w * data.logits.max(axis=1), data.logits.argmax(axis=1))

    assert get_method("weighted").resolve({"w": 5.0}) == {"w": 5.0}
    with pytest.raises(FeatcacheError, match="nap\\+weighted: weighted: parameter names clash with NAP's"):
        get_method("nap+weighted")
    main(["methods"])  # still lists every method
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("weighted "))
    assert lines[at].split() == ["weighted", "w=2.0"] and "cifar10: none given" in lines[at + 1]
    assert lines[at + 2].strip().startswith("from module: ") and not any(line.startswith("nap+weighted") for line in lines)


def test_a_method_registered_in_main_cannot_go_to_workers(random_digits, tmp_path):
    import featcache
    from featcache.methods import Output
    from featcache.sweep import run_sweep

    def interactive(data, head, fit):
        return Output(-np.linalg.norm(data.features, axis=1), data.logits.argmax(axis=1))

    interactive.__module__ = "__main__"  # as in a notebook
    featcache.register("interactive")(interactive)
    run_sweep({"interactive": {}}, random_digits["h5"], tmp_path / "one" / "sweep.csv", progress=False)
    with pytest.raises(FeatcacheError, match="registered in __main__.*plugins="):
        run_sweep({"interactive": {}}, random_digits["h5"], tmp_path / "two" / "sweep.csv", jobs=2, progress=False)


def test_a_users_module_goes_to_workers_without_plugins(random_digits, tmp_path):
    """Registered by a module the user's script imported: workers import that module by name."""
    from featcache.sweep import run_sweep

    (tmp_path / "userfeat_mod.py").write_text(PLUGIN.read_text())
    sys.path.insert(0, str(tmp_path))  # as the user's script sees it; workers started earlier do not
    try:
        __import__("userfeat_mod")
    finally:
        sys.path.remove(str(tmp_path))
    run_sweep({"featnorm": {"p": [2]}}, random_digits["h5"], tmp_path / "sweep.csv", jobs=2, progress=False)
    check_featnorm_rows(read_rows(tmp_path / "sweep.csv"), random_digits["h5"], [2])


def test_changed_plugin_version_recomputes(random_digits, tmp_path):
    """Also in two loky workers, which live on between sweeps: each sweep's plugin replaces the last."""
    from featcache.methods import REGISTRY
    from featcache.sweep import run_sweep

    def plugin(name, version, sign):
        (tmp_path / name).write_text(
            "import numpy as np\nimport featcache\nfrom featcache.methods import Output\n"
            f"@featcache.register('signed', version={version})\n"
            "def signed(data, head, fit):\n"
            f"    return Output({sign} * np.linalg.norm(data.features.astype(np.float64), axis=1), "
            "data.logits.argmax(axis=1))\n")
        return [str(tmp_path / name)]

    def auroc_on(ood):
        return {r["ood"]: float(r["auroc"]) for r in read_rows(out)}[ood]

    out = tmp_path / "res" / "sweep.csv"
    run_sweep({"signed": {}}, random_digits["h5"], out, jobs=2, progress=False, plugins=plugin("plugin_a.py", 1, -1))
    before = auroc_on("mean")
    # the same code again: the saved progress stands
    del REGISTRY["signed"]
    run_sweep({"signed": {}}, random_digits["h5"], out, jobs=2, progress=False, plugins=plugin("plugin_a.py", 1, -1))
    assert auroc_on("mean") == before
    # same version, other code (the version not raised): recomputed all the same, from a digest of
    # the plugin's source; the score negated, so AUROC becomes 1 - AUROC on every ood split
    del REGISTRY["signed"]
    run_sweep({"signed": {}}, random_digits["h5"], out, jobs=2, progress=False, plugins=plugin("plugin_b.py", 1, 1))
    assert auroc_on("mean") == pytest.approx(1 - before, abs=1e-9)
    del REGISTRY["signed"]
    run_sweep({"signed": {}}, random_digits["h5"], out, jobs=2, progress=False, plugins=plugin("plugin_c.py", 2, -1))
    assert auroc_on("mean") == pytest.approx(before, abs=1e-9)


def test_plugin_failing_while_scoring_is_one_line(random_digits, tmp_path, capsys):
    (tmp_path / "pipes").mkdir()
    (tmp_path / "pipes" / "bad_scores.py").write_text(
        "import featcache\n@featcache.register('short')\ndef short(data, head, fit):\n"
        "    raise ValueError('features too wide\\nfor this')\n")
    pipeline = write_pipeline(tmp_path, random_digits["h5"], {"short": {}}, plugins=["bad_scores.py"])
    with pytest.raises(SystemExit):
        main(["sweep", str(pipeline), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["featcache: error: method 'short' (plugin: bad_scores.py) on split 'digits_test' failed: "
                   "ValueError: features too wide"]


def test_select_loads_the_pipelines_plugins(random_digits, tmp_path, capsys):
    """Selection on pseudo-OOD with a plugin: its paper setting on the pipeline's benchmark is used."""
    (tmp_path / "pipes").mkdir()
    shutil.copy(PLUGIN, tmp_path / "pipes" / "featnorm.py")
    pipeline = write_pipeline(tmp_path, random_digits["h5"], {"featnorm": {"p": [1, 2]}}, plugins=["featnorm.py"],
                              benchmark="cifar10")
    main(["select", str(pipeline), "--quiet"])
    rows = read_rows(tmp_path / "res" / "plug" / "selection.csv")
    means = {r["choice"]: json.loads(r["params"]) for r in rows if r["ood"] == "mean"}
    assert set(means) == {"selected", "paper_default", "oracle"} and means["paper_default"] == {"p": 2.0}
    check_featnorm_rows([r for r in rows if r["choice"] == "oracle"], random_digits["h5"], [means["oracle"]["p"]])


def test_python_api_sweeps_and_scores_a_plugin_with_two_jobs(random_digits, tmp_path):
    """featcache.sweep(plugins=..., jobs=2) and featcache.scores on a plugin file, against brute force."""
    import featcache

    frame = featcache.sweep(random_digits["h5"], GRID, plugins=[str(PLUGIN)], jobs=2, progress=False)
    rows = [{k: (str(v) if k in ("method", "params", "ood") else v) for k, v in r.items()}
            for r in frame.to_dict("records")]
    check_featnorm_rows(rows, random_digits["h5"], [1, 2, 3])
    table = featcache.scores(random_digits["h5"], "featnorm", plugins=[str(PLUGIN)], p=3)
    splits = raw_splits(random_digits["h5"])
    for name, (_, x, _, _) in splits.items():
        expected = -np.sum(np.abs(x.astype(np.float64)) ** 3, axis=1) ** (1 / 3)
        np.testing.assert_allclose(table[table.split == name].score.to_numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("body, fragment", [
    ("    sys.exit(0)\n", "failed: SystemExit"),
    ("    return Output(np.zeros(len(data.labels)), np.full(len(data.labels), 99))\n",
     "predictions must be integer classes of the head (0..9)"),
    ("    return Output(np.zeros(len(data.labels)), np.zeros(len(data.labels)))\n",
     "predictions must be integer classes of the head"),
])
def test_a_plugin_cannot_end_a_sweep_quietly_or_give_other_classes(random_digits, tmp_path, capsys, body, fragment):
    (tmp_path / "pipes").mkdir()
    (tmp_path / "pipes" / "odd.py").write_text(
        "import sys\nimport numpy as np\nimport featcache\nfrom featcache.methods import Output\n"
        "@featcache.register('odd')\ndef odd(data, head, fit):\n" + body)
    pipeline = write_pipeline(tmp_path, random_digits["h5"], {"odd": {}}, plugins=["odd.py"])
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(pipeline), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and fragment in err and len(err.splitlines()) == 1


def test_exit_at_import_and_paper_settings_the_method_does_not_take_are_errors(tmp_path):
    from featcache.plugins import load_plugins

    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(FeatcacheError, match="importing it failed: SystemExit"):
        load_plugins([str(tmp_path / "exits.py")])
    (tmp_path / "paper.py").write_text(
        "import featcache\n@featcache.register('badpaper', defaults={'p': 2.0}, paper={'cifar10': {'q': 3}})\n"
        "def badpaper(data, head, fit, p):\n    pass\n")
    with pytest.raises(FeatcacheError, match="its paper setting on cifar10: badpaper: unknown parameter 'q'"):
        load_plugins([str(tmp_path / "paper.py")])


def test_the_api_takes_one_plugin_as_a_string_and_scores_files_carry_provenance(random_digits, tmp_path):
    import featcache
    from featcache.api import write_scores

    table = featcache.scores(random_digits["h5"], "featnorm", plugins=str(PLUGIN), p=1)
    write_scores(table, tmp_path / "s.parquet")
    meta = json.loads((tmp_path / "s.parquet.meta.json").read_text())
    with h5py.File(random_digits["h5"], "r") as fh:
        assert meta["fingerprint"] == fh.attrs["fingerprint"] and meta["backbone"] == fh.attrs["backbone"]
    assert meta["method"] == "featnorm" and json.loads(meta["params"]) == {"p": 1} and meta["command"] == "scores"
    # another configuration beside it, same stem: each file keeps its own meta file
    write_scores(featcache.scores(random_digits["h5"], "energy"), tmp_path / "s.csv")
    assert json.loads((tmp_path / "s.parquet.meta.json").read_text())["method"] == "featnorm"
    assert json.loads((tmp_path / "s.csv.meta.json").read_text())["method"] == "energy"
