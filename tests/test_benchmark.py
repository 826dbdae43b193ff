"""tools/benchmark.py: every code path in a CPU dry run, the rows, the timing maths, the original recipe's
k-NN, the k-NN backends profile, and every flag checked before any work starts."""

from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.synthetic import make_jpeg_folder
from tools import benchmark as B
from tools.bench import baseline as O
from tools.bench.harness import Cycle, Variant, measure, with_repeat
from tools.bench.profiles import PROFILES
from tools.engine.cli import run_cli
from tools.eval.knn import faiss_module

KEYS = {"stage", "config", "key", "img_s", "ratio_vs_baseline", "spread"}
# Every row the GPU profile has (rows.json keys): what the hours profile and BENCHMARKS.md read.
GPU_PROFILE_KEYS = [
    "data.original", "data.cpu", "data.gpu", "data.dali", "data.repeat",
    "step.original", "step.fp32", "step.bf16", "step.compiled", "step.repeat",
    "e2e.original", "e2e.cpu", "e2e.cpu_loader", "e2e.gpu", "e2e.gpu_loader", "e2e.repeat",
    "cached.original", "cached.live", "cached.mmap", "cached.device", "cached.x4_r50", "cached.repeat",
    "knn.original", "knn.ours", "knn.repeat",
    "probe.original", "probe.ours", "probe.repeat",
]  # fmt: skip


@pytest.mark.slow
def test_gpu_profile_dry_run_covers_every_stage_and_path(tmp_path):
    out = tmp_path / "rows.json"
    args = B.get_args_parser().parse_args(
        ["gpu", "--dry_run", "--device", "cpu", "--work_dir", str(tmp_path), "--json", str(out)]
    )
    rows = B.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert [r["key"] for r in rows] == GPU_PROFILE_KEYS
    for stage in PROFILES["gpu"]["stages"]:
        mine = [r for r in rows if r["stage"] == stage]
        assert [r["role"] for r in mine].count("repeat") == 1 and mine[-1]["role"] == "repeat"
        assert next(r for r in mine if r["role"] == "baseline")["ratio_vs_baseline"] == 1.0
    for r in rows:
        assert KEYS <= set(r) and r["profile"] == "gpu (dry run)"
        if r.get("skipped"):
            assert r["img_s"] is None and r["note"].startswith("skipped") and r["key"] == "data.dali"
        else:
            assert r["img_s"] > 0 and r["spread"] >= 0 and len(r["rounds"]) == 2
    by = {r["key"]: r for r in rows}
    # the GPU-only paths ran on the CPU: --decode gpu's batched decoding, compiled student + folded teacher
    assert by["data.gpu"]["config"] == "ours: --decode gpu (batched decode_jpeg on cpu)"
    assert by["step.compiled"]["config"] == "ours: bf16, channels_last, compiled (aot_eager)"
    for key in ("cached.mmap", "cached.device", "cached.x4_r50"):
        assert 0 < by[key]["gather_fraction_of_step"] < 1
    assert by["cached.x4_r50"]["ratio_vs_baseline"] is None  # another workload: no ratio to R50 -> R18
    assert all(by[k]["bound"] in ("data", "step") for k in ("e2e.cpu", "e2e.gpu"))
    assert by["knn.ours"]["same_top1_as_baseline"] == 1.0  # eval_knn's search finds the original's neighbours
    assert by["probe.ours"]["forty_epochs_s"] > 0


def test_a_profile_is_one_registry_entry_the_demo_students(tmp_path):
    argv = ["demo", "--dry_run", "--set", "students=resnet18,mobilenet_v3_small", "--json", str(tmp_path / "d.json")]
    rows = B.main(B.get_args_parser().parse_args(argv))
    assert [r["key"] for r in rows] == ["students.resnet18", "students.mobilenet_v3_small", "students.repeat"]
    assert rows[0]["ratio_vs_baseline"] == 1.0 and all(r["img_s"] > 0 and len(r["rounds"]) == 1 for r in rows)
    assert {r["profile"] for r in rows} == {"demo (dry run)"} and set(PROFILES["demo"]) >= {"help", "stages", "sizes"}


def test_measure_interleaves_and_computes_ratio_and_spread(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr("tools.bench.harness.time.perf_counter", lambda: clock["t"])
    order = []
    seconds = {"base": iter([1.0] * 7), "fast": iter([1.0, 0.4, 0.5, 0.5]), "part": iter([1.0, 0.1, 0.1, 0.1])}

    def work(name):
        def run():
            order.append(name)
            clock["t"] += next(seconds[name])
            return 10

        return run

    variants = with_repeat([Variant("base", work("base"), "baseline"), Variant("fast", work("fast"), key="f"),
                            Variant("part", work("part"), "component", key="p")])  # fmt: skip
    variants.append(Variant("off", None, note="skipped: not here", key="off"))
    rows = measure("s", variants, 3, torch.device("cpu"), "images")
    assert order == ["base", "fast", "part"] + ["base", "fast", "part", "base"] * 3  # warm-up once, then rounds
    by = {r["config"]: r for r in rows}
    assert by["base"]["img_s"] == 10.0 and by["base"]["ratio_vs_baseline"] == 1.0
    assert by["fast"]["rounds"] == pytest.approx([25.0, 20.0, 20.0]) and by["fast"]["ratio_vs_baseline"] == 2.0
    assert by["fast"]["spread"] == pytest.approx(0.25) and by["fast"]["key"] == "s.f"
    assert by["part"]["img_s"] == pytest.approx(100.0) and by["part"]["ratio_vs_baseline"] is None
    assert by["base (repeat)"]["role"] == "repeat" and by["base (repeat)"]["spread"] == pytest.approx(0)
    assert by["off"]["img_s"] is None and by["off"]["skipped"] and by["base"]["key"] == "s.baseline"


@pytest.mark.parametrize("with_faiss", [True, False])
def test_original_knn_search_is_exact_l2_and_its_vote_breaks_ties_at_random(monkeypatch, with_faiss):
    if with_faiss and O.faiss_or_none() is None:
        pytest.skip("faiss is not installed")
    if not with_faiss:
        monkeypatch.setattr(O, "faiss_or_none", lambda: None)
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(500, 8, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=1)
    idx = O.original_search(train.numpy(), queries.numpy(), 5)
    want = np.argsort(torch.cdist(queries.double(), train.double()).numpy(), axis=1)[:, :5]
    assert np.array_equal(idx, want)
    labels = np.array([2, 1, 2, 0, 3, 3, 1, 1])
    neighbours = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [3, 3, 3, 3]])  # votes: clear 2; tie {3, 1}; clear 0
    picks = {tuple(O.original_vote(labels, neighbours, random.Random(s))) for s in range(40)}
    assert picks == {(2, 3, 0), (2, 1, 0)}  # both tied classes come up, never an untied one


def test_original_knn_counts_queries_on_host_and_on_a_device():
    feats = torch.randn(50, 4)
    for device in (None, torch.device("cpu")):
        knn = O.OriginalKnn(feats, torch.randint(0, 3, (50,)), feats[:7], ks=(1, 5), device=device)
        assert knn() == 7


def test_generated_jpegs_look_like_imagenet(tmp_path):
    made = make_jpeg_folder(str(tmp_path), 4, n_classes=2)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "train") for f in fs)
    assert len(files) == 4 and made["n_images"] == 4
    assert Image.open(files[0]).size == (501, 374) and Image.open(files[1]).size == (500, 375)
    assert 70 < made["mean_kb"] < 140
    assert make_jpeg_folder(str(tmp_path), 4, n_classes=2) == made  # reused, not rewritten


def test_cycle_wraps_keys():
    data = list(range(3))
    c = Cycle(data, 7)
    assert len(c) == 7 and [c[i] for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]

    class Keyed(list):
        def __getitem__(self, key):
            return key

    assert Cycle(Keyed([0, 0]), 5)[(3, 9)] == (1, 9)


def test_a_failing_stage_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(p, ctx):
        raise ValueError("simulated")

    monkeypatch.setitem(PROFILES["cpu"]["stages"], "knn", broken)
    out = tmp_path / "rows.json"
    args = B.get_args_parser().parse_args(
        ["cpu", "--dry_run", "--stages", "knn,probe", "--work_dir", str(tmp_path), "--json", str(out)]
    )
    with pytest.raises(RuntimeError, match="knn failed"):
        B.main(args)
    rows = json.loads(out.read_text())
    assert rows[0]["failed"] and rows[0]["note"] == "failed: ValueError: simulated" and rows[0]["key"] == "knn.failed"
    assert [r["stage"] for r in rows[1:]] == ["probe"] * 3 and all(r["img_s"] > 0 for r in rows[1:])


# ============ flags: one sentence and exit status 2, before any work ============
def exit_with(module, argv: list[str], capsys, caplog) -> tuple[int, str]:
    """Parse and run a command as its ``__main__`` does; (exit status, what it printed or logged)."""
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        run_cli(module.main, module.get_args_parser().parse_args(argv))
    return stop.value.code, capsys.readouterr().err + caplog.text


@pytest.fixture
def paths(tmp_path) -> dict:
    (tmp_path / "a_file").write_text("x")
    return {"dir": str(tmp_path), "file": str(tmp_path / "a_file"), "under_file": str(tmp_path / "a_file" / "r.json")}


BENCHMARK_MISTAKES = [
    (["cpu", "--rounds", "0"], "--rounds: expected a positive integer"),
    (["cpu", "--images", "-3"], "--images: expected a positive integer"),
    (["cpu", "--images", "4"], "--images 4 is fewer than one batch of this profile (32)"),
    (["cpu", "--crop", "4"], "--crop: expected an image size in pixels"),
    (["cpu", "--jpeg_size", "500"], "--jpeg_size: expected WIDTHxHEIGHT"),
    (["cpu", "--jpeg_size", "5x5"], "--jpeg_size: expected a width and height between 8 and 8192"),
    (["cpu", "--threads", "0"], "--threads: expected a positive integer"),
    (["cpu", "--seed", "-1"], "--seed: expected an integer >= 0"),
    (["cpu", "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N"),
    (["tpu"], "argument profile: invalid choice: 'tpu'"),
    (["cpu", "--stages", "data,warp"], "unknown stage(s) warp in --stages"),
    (["cpu", "--stages", ","], "unknown stage(s) (none given)"),
    (["cpu", "--json", "{dir}"], "is a folder; give the file to write"),
    (["cpu", "--json", "{under_file}"], "which is a file; give another path"),
    (["cpu", "--summary", "{dir}"], "--summary '{dir}' is a folder; give the file to write"),
    (["cpu", "--work_dir", "{file}"], "--work_dir '{file}' is a file; give a folder"),
    (["cpu", "--set", "step_batch"], "--set step_batch: give NAME=VALUE with NAME one of the cpu profile's sizes"),
    (["cpu", "--set", "warp=9"], "--set warp=9: give NAME=VALUE with NAME one of the cpu profile's sizes"),
    (["cpu", "--set", "step_batch=0"], "--set step_batch=0: expected a positive integer"),
    (["cpu", "--set", "compile=maybe"], "--set compile=maybe: expected yes or no"),
    (["knn", "--images", "64"], "--images does not apply to the knn profile"),
    (["cpu", "--rows", "{file}"], "--rows is read by the hours profile, not by cpu"),
]
if not torch.cuda.is_available():
    BENCHMARK_MISTAKES += [
        (["cpu", "--device", "cuda"], "no CUDA GPU is visible; use --device cpu"),
        (["gpu"], "the gpu profile needs a CUDA device"),
        (["main_job"], "the main_job profile needs a CUDA device; add --dry_run"),
    ]


@pytest.mark.parametrize(
    ("argv", "message"), BENCHMARK_MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_benchmark_flag_mistakes_get_one_sentence_and_status_2(argv, message, paths, capsys, caplog, monkeypatch):
    monkeypatch.setattr(B, "prepare_jpegs", lambda *a: pytest.fail("work started before the flags were checked"))
    argv = [a.format(**paths) for a in argv]
    code, text = exit_with(B, [*argv, "--work_dir", paths["dir"]] if "--work_dir" not in argv else argv, capsys, caplog)
    assert code == 2 and message.format(**paths) in text
    assert "Traceback" not in text


KNN_MISTAKES = [
    (["--set", "knn_train=0"], "--set knn_train=0: expected a positive integer"),
    (["--set", "knn_queries=x"], "--set knn_queries=x: expected a positive integer"),
    (["--set", "knn_dim=-1"], "--set knn_dim=-1: expected a positive integer"),
    (["--set", "knn_classes=0"], "--set knn_classes=0: expected a positive integer"),
    (["--set", "knn_k=0"], "--set knn_k=0: expected a positive integer"),
    (["--set", "knn_train=10", "--set", "knn_k=20"], "knn_k 20 is more than knn_train 10"),
    (["--rounds", "0"], "--rounds: expected a positive integer"),
    (["--set", "knn_chunk=-1"], "--set knn_chunk=-1: expected an integer >= 0"),
    (["--set", "knn_backends=torch,annoy"], "knn_backends torch,annoy: choose from torch, faiss"),
    (["--device", "gpu0"], "--device: expected auto, cpu, cuda or cuda:N"),
    (["--set", "knn_train=1000000000", "--set", "knn_dim=4096"], "GiB for the features, more than this machine's"),
    (["--json", "{dir}"], "is a folder; give the file to write"),
]
if not torch.cuda.is_available():
    KNN_MISTAKES.append((["--device", "cuda:0"], "no CUDA GPU is visible; use --device cpu"))


@pytest.mark.parametrize(("argv", "message"), KNN_MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_knn_profile_flag_mistakes_get_one_sentence_and_status_2(argv, message, paths, capsys, caplog, monkeypatch):
    monkeypatch.setattr("tools.bench.eval_stages.clustered_features", lambda *a, **k: pytest.fail("work started"))
    code, text = exit_with(B, ["knn", *[a.format(**paths) for a in argv]], capsys, caplog)
    assert code == 2 and message.format(**paths) in text
    assert "Traceback" not in text


def test_knn_profile_runs_both_backends_and_writes_json(tmp_path):
    out = tmp_path / "knn.json"
    sizes = {"knn_train": 400, "knn_queries": 30, "knn_dim": 16, "knn_classes": 10, "knn_k": 5}
    argv = ["knn", *[w for k, v in sizes.items() for w in ("--set", f"{k}={v}")], "--json", str(out), "--rounds", "1"]
    rows = B.main(B.get_args_parser().parse_args(argv))
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    search = [r for r in rows if r["stage"] == "knn_backends" and r["role"] != "repeat"]
    assert len(search) == (2 if faiss_module() else 1)
    assert all(r["same_neighbours_rows_pct"] == 100.0 for r in search)
    assert len({r["top1_majority"] for r in search}) == 1  # the same answer from every backend
    assert rows[0]["command"] == "python -m tools.benchmark knn " + " ".join(argv[1:])
