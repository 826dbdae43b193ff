"""tools.reproduce on a tiny row: the JSON's structure, a rerun skips finished runs, one seed retrained
from scratch reproduces its recorded numbers exactly, and the Markdown section comes from the JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from models.errors import UserError
from tools.study import grid, report, runner, verify

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
    record = json.loads((tmp_path / "out" / "verify.json").read_text())
    (check,) = record["runs"].values()
    assert record["exact_expected"] and record["ok"] and check["exact"]
    assert set(check["numbers"]) == {f"{p}.{m}" for p in ("backbone", "pred") for m in report.METRICS} | {"loss"}
    assert record["conclusions"]["features"]["agrees"]

    # A fresh clone holds summary.json only: the check reads the recorded numbers from it.
    shutil.rmtree(tmp_path / "out" / "runs")
    from_clone = reproduce(tmp_path, "--verify_seed", "0")
    assert from_clone.returncode == 0, from_clone.stderr[-3000:]
    assert "reproduced their recorded numbers exactly" in from_clone.stdout
    missing = reproduce(tmp_path, "--verify_seed", "1")
    assert missing.returncode == 2 and "seed 1 of resnet18-h4" in missing.stderr and "Traceback" not in missing.stderr


def test_shared_runs_and_rows():
    rows = grid.rows(grid.Scale())
    runs = grid.runs_of(rows)
    paper = grid.RunConfig(student="timm/resnet10t")
    assert sum(v.run == paper for r in rows for v in r.variants) == 7  # every row, twice in "features"
    assert len(runs) == len(set(runs)) == 15 and runs[0] == paper
    dense = [r for r in runs if r.data == "segdemo"]
    assert [r.loss for r in dense] == ["global", "dense", "both"] and {r.teachers for r in dense} == {("S",)}
    assert paper.key() == "timm_resnet10t-h4-single_weak-live-A-ec8e23"  # the folders recorded before the dense row
    assert [r.name for r in grid.select_rows(rows, ["views", "head"])] == ["head", "views"]
    with pytest.raises(UserError, match="'heads' is not a row of the study; choose from head, views"):
        grid.select_rows(rows, ["heads"])
    assert grid.students_of(rows, "segdemo") == ["timm/resnet10t"]
    assert grid.teachers_of(rows) == ["A", "B", "S"] and grid.students_of(rows) == [
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


def test_verification_bands_and_machine_kinds():
    seeds = {"0": {"backbone.knn1": 64.8, "loss": 0.41}, "1": {"backbone.knn1": 57.5, "loss": 0.416},
             "2": {"backbone.knn1": 59.7, "loss": 0.424}}  # fmt: skip
    lo, hi = verify.band([64.8, 57.5, 59.7], "backbone.knn1")
    std = float(np.std([64.8, 57.5, 59.7], ddof=1))
    assert (lo, hi) == pytest.approx((np.mean([64.8, 57.5, 59.7]) - 3 * std, np.mean([64.8, 57.5, 59.7]) + 3 * std))
    assert verify.band([50.0], "backbone.knn1") == (49.0, 51.0)  # one seed: the floor, 1 point
    assert verify.band([0.4], "loss") == pytest.approx((0.39, 0.41))
    got = verify.compare(seeds["0"], {"backbone.knn1": 59.72, "loss": 0.4332}, seeds)
    assert got["backbone.knn1"]["within_band"] and not got["backbone.knn1"]["exact"]
    assert got["loss"]["within_band"]  # 0.4332 against 0.4168 +- 3 x 0.0070
    far = verify.compare(seeds["0"], {"backbone.knn1": 40.0, "loss": 0.41}, seeds)
    assert not far["backbone.knn1"]["within_band"] and far["loss"]["exact"]
    here = {"cpu": "AMD EPYC", "avx2": True, "avx512f": True, "torch": "2.14.1", "threads_per_run": 1}
    assert verify.same_machine_kind(dict(here, threads_per_run=2), here)
    assert not verify.same_machine_kind(dict(here, avx512f=False), here)
    assert not verify.same_machine_kind(dict(here, cpu="Intel(R) Xeon(R) Processor"), here)


def test_rerun_conclusion_is_the_verdict_of_the_rerun_seed():
    def v(run, use_pred, m):
        return {"label": run + ("/head" if use_pred else ""), "run": run, "use_pred": use_pred,
                "mean": {"knn1": m}, "std": {"knn1": 1.0}, "config": {"student": "resnet18"}}  # fmt: skip

    row = {"name": "features", "variants": [v("p", False, 60.0), v("p", True, 53.0)]}
    row["verdict"] = report.verdict(row, {})
    summary = {"rows": [row]}
    agree = verify.conclusions(summary, {"p": {"backbone.knn1": 59.7, "pred.knn1": 53.2}})
    assert agree["features"]["agrees"] and agree["features"]["rerun_seed"].startswith("Reproduced")
    flipped = verify.conclusions(summary, {"p": {"backbone.knn1": 50.0, "pred.knn1": 53.2}})
    assert not flipped["features"]["agrees"] and flipped["features"]["rerun_seed"].startswith("Not reproduced")
    assert verify.conclusions(summary, {"other": {}}) == {}  # a row whose runs were not all rerun


def test_report_keeps_rows_recorded_elsewhere_and_names_where_a_new_row_ran(tmp_path, monkeypatch):
    """A fresh clone has summary.json only: --report keeps its rows as recorded; a row run here (the dense row)
    records this machine and command beside its numbers, and its verdict follows them."""
    previous = json.loads((ROOT / "results" / "small_scale" / "summary.json").read_text())
    previous["rows"] = [r for r in previous["rows"] if r["name"] != "dense"]
    scale = grid.Scale()
    study = runner.Study(str(tmp_path), str(tmp_path / "data"), scale, {})
    here = dict(previous["machine"], avx512f=not previous["machine"]["avx512f"])
    monkeypatch.setattr(report, "machine", lambda: here)
    kept = report.summarise(study, grid.rows(scale), "python -m tools.reproduce --report", previous)
    assert kept["rows"] == previous["rows"] and kept["machine"] == previous["machine"]
    assert kept["command"] == previous["command"] and kept["references"] == previous["references"]

    dense = next(r for r in grid.rows(scale) if r.name == "dense")
    numbers = {"global": (60.0, 20.0), "dense": (50.0, 25.0), "both": (61.0, 24.0)}  # (1-NN, mIoU)
    for v in dense.variants:
        for seed in scale.seeds:
            knn1, miou = numbers[v.run.loss]
            backbone = {"knn1": knn1 + seed * 0.1, "knn20": 1.0, "linear": 1.0, "miou": miou + seed * 0.1,
                        "pixel_acc": 90.0}  # fmt: skip
            folder = tmp_path / "runs" / v.run.key() / f"seed{seed}"
            folder.mkdir(parents=True)
            result = {
                "backbone": backbone,
                "losses": {"loss": 1.0},
                "train_s": 1.0,
                "command": "python train_student.py",
            }
            (folder / "result.json").write_text(json.dumps(result))
    summary = report.summarise(study, grid.rows(scale), "python -m tools.reproduce --only dense", previous, {"dense"})
    row = summary["rows"][-1]
    assert row["name"] == "dense" and row["machine"] == here and row["command"].endswith("--only dense")
    assert summary["machine"] == previous["machine"] and summary["rows"][:-1] == previous["rows"]
    assert row["verdict"].startswith("Dense map for segmentation: Reproduced: dense 25.1 ± 0.1 mIoU beats global")
    assert "Both keeps the 1-NN: Reproduced: both 61.1 ± 0.1 beats global 60.1 ± 0.1" in row["verdict"]
    text = report.markdown(summary, "../out")
    assert "| variant | 1-NN | 20-NN | linear (cached) | seg. mIoU | pixel acc. | final loss |" in text
    assert "This row ran as `python -m tools.reproduce --only dense` on AMD EPYC" in text
