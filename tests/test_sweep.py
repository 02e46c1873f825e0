"""Stage two end to end: replay equals the live model, the sweep CSV, and no backbone at sweep time."""

import importlib
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score

import featcache
from featcache.cli import main
from featcache.config import load_manifest
from featcache.extract.backbones import DigitsResNet, load_checkpoint
from featcache.extract.datasets import load_dataset
from featcache.methods import get_method
from featcache.replay import load_replay
from tests.conftest import REPO


# The ASH reference code (ash.py of the ASH repository), applied inside the forward pass as its
# README shows: on the pooled (N, C, 1, 1) map, before flatten and the classifier.
def ref_ash_p(x, percentile):
    b, c, h, w = x.shape
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    t = x.view((b, c * h * w))
    v, i = torch.topk(t, k, dim=1)
    t.zero_().scatter_(dim=1, index=i, src=v)
    return x


def ref_ash_b(x, percentile):
    b, c, h, w = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    t = x.view((b, c * h * w))
    v, i = torch.topk(t, k, dim=1)
    fill = s1 / k
    fill = fill.unsqueeze(dim=1).expand(v.shape)
    t.zero_().scatter_(dim=1, index=i, src=fill)
    return x


def ref_ash_s(x, percentile):
    b, c, h, w = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    t = x.view((b, c * h * w))
    v, i = torch.topk(t, k, dim=1)
    t.zero_().scatter_(dim=1, index=i, src=v)
    s2 = x.sum(dim=[1, 2, 3])
    scale = s1 / s2
    return x * torch.exp(scale[:, None, None, None])


class LiveShaped(torch.nn.Module):
    def __init__(self, model, shape):
        super().__init__()
        self.model, self.shape = model, shape

    def forward(self, x):
        m = self.model
        x = m.avgpool(m.layer3(m.layer2(m.layer1(m.stem(x)))))
        x = self.shape(x)
        return m.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("name, params, shape", [
    ("ash_p", {"p": 60}, lambda x: ref_ash_p(x, 60)),
    ("ash_b", {"p": 65}, lambda x: ref_ash_b(x, 65)),
    ("ash_s", {"p": 90}, lambda x: ref_ash_s(x, 90)),
    ("ash_s", {"p": 70}, lambda x: ref_ash_s(x, 70)),
    ("react", {"clip": 0.8}, lambda x: x.clip(max=0.8)),
    ("energy", {}, lambda x: x),
])
def test_replay_equals_live(digits, name, params, shape):
    model = load_checkpoint(DigitsResNet(), digits["checkpoint"]).eval()
    live = LiveShaped(model, shape).eval()
    manifest = load_manifest(REPO / "data_manifest.yaml")
    cache = featcache.open_cache(digits["cache"])
    replay = load_replay(cache)
    method = get_method(name)
    for split in ("digits_test", "letters", "photos"):
        images = torch.from_numpy(load_dataset(split, manifest, "m").images)
        with torch.no_grad():
            live_scores = torch.logsumexp(live(images).double(), dim=1).numpy()
        data = next(s for s in [replay.id_test] + replay.oods if s.name == split)
        replayed = method(data, replay.head, replay.fit, **method.resolve(params)).scores
        np.testing.assert_allclose(replayed, live_scores, rtol=1e-5, atol=1e-6)


def write_sweep_pipeline(tmp_path, cache, grid):
    path = tmp_path / "sweep_only.yaml"
    path.write_text(yaml.safe_dump({"name": "sweep_only", "cache": str(cache), "results": str(tmp_path / "res"),
                                    "sweep": grid}))
    return path


GRID = {"energy": {"T": [1, 2]}, "ash_s": {"p": [60, 90]}, "react": {"percentile": [90]},
        "rg": {"k": [0.5], "T": [1]}, "rg_add": {"k": [1.0], "alpha_scale": [0.5]},
        "nap+msp": {"w": [0.2, 0.8]}, "nap+energy": {"w": [0.5]}, "msp": {}}


def test_sweep_csv_against_independent_metrics(digits, tmp_path, capsys):
    pipeline = write_sweep_pipeline(tmp_path, digits["cache"], GRID)
    main(["sweep", str(pipeline), "--quiet"])
    printed = capsys.readouterr().out
    assert "FPR95" in printed and "AUROC" in printed
    with open(tmp_path / "res" / "sweep_only" / "sweep.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == ("method", "params", "ood", "fpr95", "auroc", "aupr_in", "aupr_out", "id_acc")
        rows = list(reader)
    cache = featcache.open_cache(digits["cache"])
    oods = sorted(s.name for s in cache.splits("ood"))
    configs = {(r["method"], r["params"]) for r in rows}
    assert len(configs) == 11
    for method, params in configs:
        assert params == json.dumps(json.loads(params), sort_keys=True)
        mine = {r["ood"]: r for r in rows if (r["method"], r["params"]) == (method, params)
                and not r["ood"].startswith("group:")}  # group rows: tests/test_pseudo_ood.py
        assert sorted(mine) == sorted(oods + ["mean"])
        for key in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            assert float(mine["mean"][key]) == pytest.approx(np.mean([float(mine[o][key]) for o in oods]))
    # energy at T=2 and ASH-S at p=90 recomputed from the raw cache arrays with numpy and sklearn
    test = cache.one_split("id_test")
    w, b = cache.head_weight.astype(np.float64), cache.head_bias.astype(np.float64)

    def energy(logits, T=1.0):
        z = logits / T
        m = z.max(1, keepdims=True)
        return T * (m[:, 0] + np.log(np.exp(z - m).sum(1)))

    def ash_s(x):
        out = []
        for row in x.astype(np.float64):
            keep = np.argsort(-row, kind="stable")[: row.size - int(np.round(row.size * 0.9))]
            pruned = np.zeros_like(row)
            pruned[keep] = row[keep]
            pruned *= np.exp(row.sum() / pruned.sum())
            out.append(pruned)
        return energy(np.array(out) @ w.T + b)

    for method, params, score in [("energy", '{"T": 2}', lambda s: energy(s["logits"].astype(np.float64), 2.0)),
                                  ("ash_s", '{"p": 90}', lambda s: ash_s(s["features"]))]:
        id_scores = score(test)
        for ood in oods:
            ood_scores = score(cache.split(ood))
            y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
            s = np.r_[id_scores, ood_scores]
            row = next(r for r in rows if (r["method"], r["params"], r["ood"]) == (method, params, ood))
            assert float(row["auroc"]) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
            # the reference code's trapezoid AUPR-In is within a step of sklearn's average precision
            assert float(row["aupr_in"]) == pytest.approx(average_precision_score(y, s), abs=2e-3)
            threshold = np.sort(id_scores)[round(0.05 * len(id_scores))]  # ReAct/ASH get_curve
            assert float(row["fpr95"]) == pytest.approx(np.mean(ood_scores > threshold), abs=1e-3)
            assert float(row["id_acc"]) >= 0.97


def test_sweep_needs_no_checkpoint_and_never_imports_torch(digits, tmp_path):
    """A pipeline with only cache: and sweep:, in a process that would fail if a backbone were built."""
    cache = tmp_path / "copy.h5"
    cache.write_bytes(digits["cache"].read_bytes())
    pipeline = write_sweep_pipeline(tmp_path, cache, GRID)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # importing torch now raises ImportError\n"
        "from featcache.cli import main\n"
        f"main(['sweep', {str(pipeline)!r}, '--quiet'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "res" / "sweep_only" / "sweep.csv").exists()


@pytest.mark.parametrize("grid, message", [
    ({"ash_ss": {"p": [90]}}, "did you mean 'ash_s'"),
    ({"ash_s": {"p": [90, 100]}}, "p must be"),
    ({"nap+energy": {"w": [1.5]}}, "w must be"),
])
def test_bad_grid_is_one_line(digits, tmp_path, capsys, grid, message):
    pipeline = write_sweep_pipeline(tmp_path, digits["cache"], grid)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(pipeline), "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "res" / "sweep_only" / "sweep.csv").exists()


def test_parallel_sweep_equals_serial(digits, tmp_path):
    from featcache.sweep import run_sweep

    run_sweep(GRID, digits["cache"], tmp_path / "serial" / "sweep.csv", progress=False)
    run_sweep(GRID, digits["cache"], tmp_path / "parallel" / "sweep.csv", jobs=2, progress=False)
    assert (tmp_path / "serial" / "sweep.csv").read_text() == (tmp_path / "parallel" / "sweep.csv").read_text()


def test_interrupted_sweep_computes_only_the_missing_configurations(digits, tmp_path, monkeypatch):
    sweep_mod = importlib.import_module("featcache.sweep")  # featcache.sweep is the API function
    from featcache.grid import batches_by_method

    out = tmp_path / "res" / "sweep.csv"
    original = sweep_mod.sweep_batch
    computed = []

    def dying_after_three(cache_path, configs, storage_options=None, **kwargs):
        if len(computed) == 3:
            raise KeyboardInterrupt
        computed.append([name for name, _ in configs])
        return original(cache_path, configs, storage_options, **kwargs)

    # a serial sweep runs one batch; per-method batches here, so that it dies between batches
    monkeypatch.setattr(sweep_mod, "batches_for", lambda configs, parallel: batches_by_method(configs))
    monkeypatch.setattr(sweep_mod, "sweep_batch", dying_after_three)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.run_sweep(GRID, digits["cache"], out, progress=False)
    assert not out.exists()
    first = [name for batch in computed for name in batch]

    def counting(cache_path, configs, storage_options=None, **kwargs):
        computed.append([name for name, _ in configs])
        return original(cache_path, configs, storage_options, **kwargs)

    computed.clear()
    monkeypatch.setattr(sweep_mod, "sweep_batch", counting)
    sweep_mod.run_sweep(GRID, digits["cache"], out, progress=False)
    again = [name for batch in computed for name in batch]
    assert not set(first) & set(again)
    assert len(first) + len(again) == sum(len(sweep_mod.expand_grid({m: g})) for m, g in GRID.items())
    clean = tmp_path / "clean" / "sweep.csv"
    monkeypatch.setattr(sweep_mod, "sweep_batch", original)
    sweep_mod.run_sweep(GRID, digits["cache"], clean, progress=False)
    assert out.read_text() == clean.read_text()
    meta = json.loads((tmp_path / "res" / "sweep.meta.json").read_text())
    assert meta["fingerprint"] == featcache.open_cache(digits["cache"]).fingerprint


def test_progress_of_another_cache_is_never_reused(digits, tmp_path):
    from featcache.progress import ProgressStore

    out = tmp_path / "sweep.csv"

    def store(fingerprint):
        return ProgressStore(out, fingerprint, {"energy": "1"}, [], "digits_test")

    store("a" * 64).add([{"method": "energy", "params": '{"T": 1}', "ood": "mean", "fpr95": 0.0,
                          "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "id_acc": 1.0}])
    assert store("a" * 64).done
    assert not store("b" * 64).done


def test_sweep_on_a_local_dask_cluster_equals_serial(digits, tmp_path):
    pytest.importorskip("dask.distributed")
    from dask.distributed import LocalCluster

    from featcache.sweep import run_sweep

    run_sweep(GRID, digits["cache"], tmp_path / "serial" / "sweep.csv", progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        run_sweep(GRID, digits["cache"], tmp_path / "dask" / "sweep.csv", progress=False, backend="dask",
                  scheduler=cluster.scheduler_address)
    assert (tmp_path / "serial" / "sweep.csv").read_text() == (tmp_path / "dask" / "sweep.csv").read_text()
