"""tools/benchmark.py: the GPU profile's every code path in a CPU dry run, the JSON rows, the timing maths."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data.synthetic import make_jpeg_folder
from models.errors import UserError
from tools import benchmark as B

KEYS = {"stage", "config", "img_s", "ratio_vs_baseline", "spread"}


@pytest.mark.slow
def test_gpu_profile_dry_run_covers_every_stage_and_path(tmp_path):
    out = tmp_path / "rows.json"
    args = B.get_args_parser().parse_args(
        ["--profile", "gpu", "--dry_run", "--device", "cpu", "--work_dir", str(tmp_path), "--json", str(out)]
    )
    rows = B.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert [r["stage"] for r in rows if r["role"] == "baseline"] == list(B.STAGES)
    for stage in B.STAGES:
        mine = [r for r in rows if r["stage"] == stage]
        assert [r["role"] for r in mine].count("repeat") == 1 and mine[-1]["role"] == "repeat"
        assert next(r for r in mine if r["role"] == "baseline")["ratio_vs_baseline"] == 1.0
    for r in rows:
        assert KEYS <= set(r) and r["profile"] == "gpu (dry run)"
        if r.get("skipped"):
            assert r["img_s"] is None and r["note"].startswith("skipped")
        else:
            assert r["img_s"] > 0 and r["spread"] >= 0 and len(r["rounds"]) == 2
    configs = {r["config"] for r in rows if not r.get("skipped")}
    # the GPU-only paths ran on the CPU: batched device decoding, compiled student + folded teacher
    assert "ours: batched decode_jpeg on cpu" in configs
    assert "ours: bf16, channels_last, compiled (aot_eager)" in configs
    assert any(c.startswith("ours: decode on cpu + step") for c in configs)
    cached = next(r for r in rows if r["stage"] == "cached" and "cached teacher" in r["config"])
    assert 0 < cached["gather_fraction_of_step"] < 1
    e2e = [r for r in rows if r["stage"] == "e2e" and "+ step" in r["config"] and r["role"] == "variant"]
    assert len(e2e) == 2 and all(r["bound"] in ("data", "step") for r in e2e)


def test_measure_interleaves_and_computes_ratio_and_spread(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(B.time, "perf_counter", lambda: clock["t"])
    order = []
    seconds = {"base": iter([1.0] * 7), "fast": iter([1.0, 0.4, 0.5, 0.5])}  # warm-up first

    def work(name):
        def run():
            order.append(name)
            clock["t"] += next(seconds[name])
            return 10

        return run

    variants = B.with_repeat([B.Variant("base", work("base"), "baseline"), B.Variant("fast", work("fast"))])
    variants.append(B.Variant("off", None, note="skipped: not here"))
    rows = B.measure("s", variants, 3, torch.device("cpu"), "images")
    assert order == ["base", "fast"] + ["base", "fast", "base"] * 3  # warm-up once, then rounds
    by = {r["config"]: r for r in rows}
    assert by["base"]["img_s"] == 10.0 and by["base"]["ratio_vs_baseline"] == 1.0
    assert by["fast"]["rounds"] == pytest.approx([25.0, 20.0, 20.0]) and by["fast"]["ratio_vs_baseline"] == 2.0
    assert by["fast"]["spread"] == pytest.approx(0.25)
    assert by["base (repeat)"]["role"] == "repeat" and by["base (repeat)"]["spread"] == pytest.approx(0)
    assert by["off"]["img_s"] is None and by["off"]["skipped"]


def test_knn_topk_equals_brute_force_and_vote():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(500, 8, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=1)
    sims, idx = B.knn_topk(train, queries, 5, chunk=10)
    full = queries.double() @ train.double().T
    want = np.argsort(-full.numpy(), axis=1)[:, :5]
    assert np.array_equal(idx.numpy(), want)
    assert torch.allclose(sims.double(), full.gather(1, idx), atol=1e-6)
    votes = B.majority_vote(torch.tensor([[2, 1, 2, 0], [3, 3, 1, 1], [0, 0, 0, 0]]), 4)
    assert votes.tolist() == [2, 1, 0]  # a tie goes to the lowest label


def test_gpu_profile_needs_cuda_unless_dry(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = B.get_args_parser().parse_args(["--profile", "gpu", "--work_dir", str(tmp_path)])
    with pytest.raises(UserError, match="needs a CUDA device"):
        B.main(args)


def test_unknown_stage_is_refused(tmp_path):
    args = B.get_args_parser().parse_args(["--stages", "data,warp", "--work_dir", str(tmp_path)])
    with pytest.raises(UserError, match="unknown stage"):
        B.main(args)


def test_generated_jpegs_look_like_imagenet(tmp_path):
    made = make_jpeg_folder(str(tmp_path), 4, n_classes=2)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "train") for f in fs)
    assert len(files) == 4 and made["n_images"] == 4
    assert Image.open(files[0]).size == (501, 374) and Image.open(files[1]).size == (500, 375)
    assert 70 < made["mean_kb"] < 140
    assert make_jpeg_folder(str(tmp_path), 4, n_classes=2) == made  # reused, not rewritten


def test_cycle_wraps_keys():
    data = list(range(3))
    c = B.Cycle(data, 7)
    assert len(c) == 7 and [c[i] for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]

    class Keyed(list):
        def __getitem__(self, key):
            return key

    assert B.Cycle(Keyed([0, 0]), 5)[(3, 9)] == (1, 9)


def test_a_failing_stage_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(p, ctx):
        raise ValueError("simulated")

    monkeypatch.setitem(B.STAGES, "knn", broken)
    out = tmp_path / "rows.json"
    args = B.get_args_parser().parse_args(
        ["--dry_run", "--stages", "knn,probe", "--work_dir", str(tmp_path), "--json", str(out)]
    )
    with pytest.raises(RuntimeError, match="knn failed"):
        B.main(args)
    rows = json.loads(out.read_text())
    assert rows[0]["failed"] and rows[0]["note"] == "failed: ValueError: simulated"
    assert [r["stage"] for r in rows[1:]] == ["probe"] * 3 and all(r["img_s"] > 0 for r in rows[1:])
