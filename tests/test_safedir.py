"""A job's output cannot be redirected by a symlink swapped in while it runs."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from service.scoring import ScoringError
from service.scoring.writer import Output, part_name

pytestmark = pytest.mark.unit


def _chunk() -> pa.Table:
    return pa.table({"row": [0, 1], "score": [0.5, 0.25]})


def test_a_folder_swapped_for_a_symlink_mid_job_gets_no_writes(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    output = Output(root / "out", root)
    manifest = output.open({"job": 1}, total_rows=4)
    try:
        os.rename(root / "out", root / "moved")  # the attacker swaps the folder for a symlink
        (root / "out").symlink_to(outside, target_is_directory=True)
        output.commit(manifest, _chunk(), 2, [(3, "bad row")], 0.1)
        output.commit(manifest, _chunk(), 2, [], 0.1)
    finally:
        output.close()
    assert list(outside.iterdir()) == []
    written = {p.name for p in (root / "moved").iterdir()}
    assert {part_name(0), part_name(1), "_manifest.json", "_errors.csv"} <= written


def test_a_symlinked_output_component_is_refused_under_a_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ScoringError, match="symlink"):
        Output(root / "link" / "out", root).open({"job": 1}, total_rows=4)
    assert list(outside.iterdir()) == []


def test_a_planted_symlink_for_a_file_name_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    output = Output(root / "out", root)
    manifest = output.open({"job": 1}, total_rows=4)
    try:
        (root / "out" / ("_tmp-" + part_name(0))).symlink_to(victim)
        with pytest.raises(OSError):
            output.commit(manifest, _chunk(), 2, [], 0.1)
    finally:
        output.close()
    assert victim.read_text() == "precious"
