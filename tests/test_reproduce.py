"""tools.reproduce on a tiny row: the JSON's structure, a rerun skips finished runs, one seed retrained
from scratch reproduces its recorded numbers exactly, and the Markdown section comes from the JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from models.errors import UserError
from tools.study import grid, report

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny_folder(root, n=12, size=16):
    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in range(2):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(n):
                pix = rng.randint(0, 60, (size, size, 3)).astype(np.uint8)
                pix[c * 8 : c * 8 + 8] += 150  # class 0 bright on top, class 1 at the bottom
                Image.fromarray(pix).save(root / split / str(c) / f"{i}.png")
    return root


def reproduce(tmp_path, *extra):
    cmd = [sys.executable, "-m", "tools.reproduce", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
           "--teacher_a", str(tmp_path / "a.pth"), "--only", "features", "--student", "resnet18",
           "--seeds", "1", "--epochs", "1",
           "--batch_size", "4", "--image_size", "16", "--probe_epochs", "2",
           "--doc", str(tmp_path / "docs" / "study.md"),
           *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_row_records_skips_and_reproduces(tmp_path):
    tiny_folder(tmp_path / "data")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "a.pth")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "study.md").write_text(f"intro\n{report.START}\nSTALE STUDY TEXT\n{report.END}\nrest\n")
    first = reproduce(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) >= {"machine", "command", "scale", "references", "rows", "teachers"}
    (row,) = summary["rows"]
    assert row["name"] == "features" and [v["use_pred"] for v in row["variants"]] == [False, True]
    for v in row["variants"]:
        assert set(v["per_seed"]) == {"0"} and v["std"]["knn1"] == 0.0
        assert v["mean"]["knn1"] == v["per_seed"]["0"]["knn1"] and 0 <= v["mean"]["linear"] <= 100
        assert v["command"].startswith("python train_student.py") and "--knn_every" in v["command"]
    assert set(summary["references"]) == {"teacher A", "random-init resnet18"}
    assert (tmp_path / "out" / "features.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "paper_curves.png").exists()
    doc = (tmp_path / "docs" / "study.md").read_text()
    assert doc.startswith("intro\n") and doc.endswith("rest\n") and "STALE STUDY TEXT" not in doc
    assert f"{row['variants'][0]['mean']['knn1']:.1f} ± 0.0" in doc
    assert "](../out/features.png)" in doc and "](../out/summary.json)" in doc  # links from docs/ to the study

    result = next((tmp_path / "out" / "runs").glob("*/seed0/result.json"))
    stamp = result.stat().st_mtime_ns
    again = reproduce(tmp_path)
    assert again.returncode == 0 and "skipping finished run" in again.stderr
    assert result.stat().st_mtime_ns == stamp

    verified = reproduce(tmp_path, "--verify_seed", "0")
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert "reproduced their recorded numbers exactly" in verified.stdout
    (check,) = json.loads((tmp_path / "out" / "verify.json").read_text())["runs"].values()
    assert check["match"] and check["rerun_backbone"] == check["recorded_backbone"]


def test_shared_runs_and_rows():
    rows = grid.rows(grid.Scale())
    runs = grid.runs_of(rows)
    paper = grid.RunConfig(student="timm/resnet10t")
    assert sum(v.run == paper for r in rows for v in r.variants) == 7  # every row, twice in "features"
    assert len(runs) == len(set(runs)) == 12 and runs[0] == paper
    assert [r.name for r in grid.select_rows(rows, ["views", "head"])] == ["head", "views"]
    with pytest.raises(UserError, match="'heads' is not a row of the study; choose from head, views"):
        grid.select_rows(rows, ["heads"])
    assert grid.teachers_of(rows) == ["A", "B"] and grid.students_of(rows) == [
        "mobilenet_v2",
        "resnet18",
        "timm/resnet10t",
    ]


def test_verdicts_follow_the_numbers():
    def v(label, m, s):
        return {"label": label, "mean": {"knn1": m}, "std": {"knn1": s}, "config": {"student": "resnet18"}}

    row = {"name": "head", "variants": [v("4", 80.0, 1.0), v("2", 75.0, 1.0), v("0", 70.0, 0.5)]}
    assert report.verdict(row, {}).startswith("Reproduced: 4 80.0 ± 1.0; it beats 2 (75.0 ± 1.0)")
    row["variants"][1] = v("2", 80.5, 1.0)
    assert report.verdict(row, {}).startswith("Within noise") and "it ties with 2" in report.verdict(row, {})
    row["variants"][1] = v("2", 85.0, 1.0)
    assert report.verdict(row, {}).startswith("Not reproduced") and "it loses to 2" in report.verdict(row, {})
