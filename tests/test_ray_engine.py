"""The Ray Data engine on a local Ray: the same rows, answers and errors as in-process scoring."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from service.scoring import ScoringError
from service.scoring.plan import local_model, prepare
from service.scoring.writer import ERRORS
from tests.test_scoring import assert_same_answers, list_parquet, read_output, rows_of, score

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module (starting Ray takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_ray_output_equals_the_in_process_engines(local_ray, repository, tmp_path):
    x = rows_of(repository, "cnn", 1200)
    rows = [*x]
    rows[7], rows[800] = None, x[800][:50]  # a null row and a short one
    x[300] = np.nan
    rows[300] = x[300]
    list_parquet(tmp_path / "in.parquet", rows, fixed=False)
    np.save(tmp_path / "in.npy", x)

    for name in ("in.parquet", "in.npy"):
        local, on_ray = tmp_path / f"local-{name[3:]}", tmp_path / f"ray-{name[3:]}"
        assert score(repository, "cnn", tmp_path / name, local, "--batch-size", 100) == 0
        code = score(repository, "cnn", tmp_path / name, on_ray, "--batch-size", 100,
                     "--engine", "ray", "--ray-actors", 1)  # fmt: skip
        assert code == 0
        assert_same_answers(read_output(on_ray), read_output(local))
        assert (on_ray / ERRORS).read_text() == (local / ERRORS).read_text()
    assert (on_ray / ERRORS).read_text().count("\n") == 2  # the npy: the NaN row only


def test_ray_refuses_an_npy_output_and_an_existing_folder(repository, tmp_path):
    from service.scoring import ray_engine

    np.save(tmp_path / "in.npy", rows_of(repository, "cnn", 10))
    config, version, path = local_model(repository, "cnn", None)
    plan = prepare(config, version, tmp_path / "in.npy", tmp_path / "o.npy", engine="ray")
    with pytest.raises(ScoringError, match="writes Parquet"):
        ray_engine.score(plan, path)
    (tmp_path / "o").mkdir()
    plan = prepare(config, version, tmp_path / "in.npy", tmp_path / "o", engine="ray")
    with pytest.raises(ScoringError, match="needs a new one"):
        ray_engine.score(plan, path)
