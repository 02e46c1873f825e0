import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_pipeline(tmp: Path, *, name="digits", checkpoint="trained", cache=None, overrides=None) -> Path:
    """A copy of pipelines/digits.yaml with every path made absolute inside `tmp`."""
    spec = yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())
    spec["name"] = name
    spec["manifest"] = str(REPO / "data_manifest.yaml")
    spec["cache"] = str(cache or tmp / f"{name}.h5")
    spec["results"] = str(tmp / "results")
    if checkpoint == "random":
        spec["backbone"] = {"name": "digits_resnet", "checkpoint": "random", "seed": 0}
    else:
        spec["backbone"]["checkpoint"] = str(checkpoint if checkpoint != "trained" else tmp / "digits_resnet.pt")
    spec.update(overrides or {})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The real default pipeline, trained and extracted once per test session (about 15 s)."""
    from featcache.config import load_pipeline
    from featcache.extract.runner import extract

    tmp = tmp_path_factory.mktemp("digits")
    pipeline = write_pipeline(tmp)
    cache = extract(load_pipeline(pipeline), progress=False)
    return {"tmp": tmp, "pipeline": pipeline, "cache": cache, "checkpoint": tmp / "digits_resnet.pt"}


@pytest.fixture(scope="session")
def random_digits(tmp_path_factory):
    """The digits pipeline with a random-weight backbone: quick, for format and consistency tests."""
    from featcache.config import load_pipeline
    from featcache.extract.runner import extract

    tmp = tmp_path_factory.mktemp("random_digits")
    pipeline = write_pipeline(tmp, checkpoint="random")
    h5 = extract(load_pipeline(pipeline), progress=False)
    zarr = extract(load_pipeline(pipeline), out=tmp / "digits.zarr", progress=False)
    return {"tmp": tmp, "pipeline": pipeline, "h5": h5, "zarr": zarr}


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def copy_tree(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst
