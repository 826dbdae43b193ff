"""tools/gpu_check.sh rehearsed on the CPU (DRY=1), the main_job profile's parts, and the hours profile."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest
import torch

from models.io import write_json
from tests.conftest import ROOT
from tools import benchmark as B
from tools import gpu_check as G
from tools.bench import projection as P
from tools.engine.cli import run_cli


@pytest.mark.slow
def test_dry_run_rehearses_every_part(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "WORK": str(work)}
    done = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=G.TOTAL_S["dry"] + 300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = set(os.listdir(out))
    assert files <= OUT_FILES and len(OUT_FILES) <= 8  # what the device tool brings back: at most 8 files
    assert files >= OUT_FILES - {"bench_compile.json"}
    summary = json.loads((out / "summary.json").read_text())
    status = {r["part"]: r["status"] for r in summary["parts"]}
    assert list(status) == [p["name"] for p in G.PARTS] and summary["finished"]
    assert all(v == "ok" for k, v in status.items() if k != "compile") and status["compile"] in ("ok", "cut")
    assert summary["elapsed_s"] <= G.TOTAL_S["dry"]
    text = (out / "summary.md").read_text()
    assert "| main_job | ok |" in text and "Cut or not reached:" in text
    parts = {r["stage"]: r for r in json.loads((out / "main_job.json").read_text())}
    assert list(parts) == list(G.main_job_stages())
    assert all(r["ok"] for r in parts.values()), parts
    assert parts["train_gpu"]["epochs"] == 3 and parts["train_gpu"]["images_per_s"] > 0
    resume = parts["resume"]
    assert resume["signalled"] and "steps into the next" in resume["resumed"]
    assert resume["weights_equal"]  # on the CPU the stopped and resumed run ends bit for bit where train_gpu ended
    assert parts["train_cached"]["epochs"] == 1 and parts["knn_torch"]["top1_majority"]
    rows = json.loads((out / "bench_gpu.json").read_text())
    assert {r["profile"] for r in rows} == {"gpu (dry run)"} and not any(r.get("failed") for r in rows)
    assert "| R50 -> R18, live teacher | 8 | gpu |" in (out / "projection.md").read_text()


OUT_FILES = {"summary.md", "summary.json", "gpu_check.log", "main_job.json", "main_job.log", "bench_gpu.json",
             "bench_compile.json", "projection.md"}  # fmt: skip


# ============ the check's time budget ============
@pytest.mark.parametrize("mode", ["gpu", "dry"])
@pytest.mark.parametrize("faiss", [False, True])
def test_the_required_parts_limits_add_up_to_the_total(mode, faiss):
    """8 minutes on one GPU: every required part's limit fits, whatever the parts before it took."""
    required = [G.part_limit(p, mode, faiss) for p in G.PARTS if not p.get("optional")]
    assert sum(required) <= G.TOTAL_S[mode]
    assert G.TOTAL_S["gpu"] == 480 and [p["name"] for p in G.PARTS][-1] == "hours"
    # run with every part at its limit, the optional one gets the rest and the total still holds
    left = G.TOTAL_S[mode]
    for i, part in enumerate(G.PARTS):
        got = G.granted(i, left, mode, faiss)
        assert got == (G.part_limit(part, mode, faiss) if not part.get("optional") else left - required[-1])
        left -= max(got, 0)
    assert left == 0 or sum(required) < G.TOTAL_S[mode]


@pytest.mark.parametrize("mode", ["gpu", "dry"])
def test_the_main_jobs_part_holds_its_stages_limits(mode):
    """The main job's limit is the sum of its own stages' limits plus the profile's start (it used to be 180 s
    around 350 s of stages)."""
    from tools.bench.profiles import MAIN_JOB, MAIN_JOB_TOY

    limits = (MAIN_JOB if mode == "gpu" else MAIN_JOB_TOY)["limits"]
    assert G.MAIN_JOB_LIMIT_S[mode] == sum(limits[s] for s in G.MAIN_JOB_STAGES) + 20
    assert G.FAISS_STAGE_S[mode] == limits["knn_faiss"]
    assert set(limits) == {*G.MAIN_JOB_STAGES, "knn_faiss"}


def test_parts_are_cut_when_time_runs_short():
    gpu = [G.part_limit(p, "gpu") for p in G.PARTS]  # env, gpu_tests, main_job, bench_gpu, compile, hours
    names = [p["name"] for p in G.PARTS]
    hours, bench = gpu[names.index("hours")], gpu[names.index("bench_gpu")]
    assert G.granted(names.index("compile"), 200, "gpu") == 200 - hours  # the optional part: what is left
    assert G.granted(names.index("compile"), hours + 10, "gpu") == 10  # below MIN_OPTIONAL_S: run_part cuts it
    assert G.granted(names.index("bench_gpu"), bench + hours - 30, "gpu") == bench - 30  # later parts keep theirs
    assert G.granted(names.index("bench_gpu"), hours, "gpu") <= 0  # nothing left for it: cut


def test_the_benchmark_runs_at_the_checks_sizes_on_a_gpu_and_at_toy_sizes_in_the_rehearsal(tmp_path):
    gpu, dry = (G.Check(str(tmp_path), str(tmp_path), dry=d) for d in (False, True))
    (bench,) = G.bench_gpu_cmds(gpu)
    assert bench[bench.index("gpu") - 1 :][:2] == ["tools.benchmark", "gpu"] and "--dry_run" not in bench
    assert [bench[i + 1] for i, w in enumerate(bench) if w == "--set"] == list(G.GPU_CHECK_SIZES)
    (toy,) = G.bench_gpu_cmds(dry)
    assert "--set" not in toy and toy[-1] == "--dry_run"
    _, compiled = G.compile_cmds(gpu)
    sets = [compiled[i + 1] for i, w in enumerate(compiled) if w == "--set"]
    assert sets[0] == "compile=yes" and "compile=no" not in sets and "--stages" in compiled


def test_a_part_cut_for_time_is_recorded_and_the_summary_says_so(tmp_path):
    c = G.Check(str(tmp_path), str(tmp_path), dry=False)
    c.start -= G.TOTAL_S["gpu"] - 5  # 5 s left: not enough for the optional part
    row = G.run_part(c, [p["name"] for p in G.PARTS].index("compile"), guard=None)
    assert row["status"] == "cut" and row["note"].startswith("cut: ")
    c.results = [row]
    G.write_summary(c, done=False)
    text = (tmp_path / "summary.md").read_text()
    assert "| compile | cut |" in text and "| env | not reached |" in text and "(still running)" in text


def rows_of(**rates) -> list[dict]:
    rows = [{"key": k.replace("_", ".", 1), "img_s": v} for k, v in rates.items()]
    for r in rows:
        if r["key"] == "data.cpu":
            r["img_s_per_core"] = r["img_s"] / 16
    return rows


def test_projection_takes_the_smaller_rate_and_names_the_bound():
    rows = rows_of(**{"step_bf16": 5000.0, "step_compiled": 7000.0, "data_cpu": 4800.0, "e2e_gpu_loader": 21000.0,
                      "cached_mmap": 12000.0})  # fmt: skip
    got = {(p["run"], p["gpus"], p["decode"]): p for p in P.project(rows, P.Assumptions(cores_per_gpu=16))}
    live_cpu = got[("R50 -> R18, live teacher", 1, "cpu")]
    assert live_cpu["step_per_gpu"] == 7000.0 and live_cpu["loader_per_gpu"] == 4800.0  # 300 per core x 16
    assert live_cpu["bound"] == "CPU decoding" and live_cpu["images_per_s"] == 4800.0
    assert live_cpu["hours"] == pytest.approx(130 * 5004 * 256 / 4800 / 3600)  # 9.64 h
    live_gpu = got[("R50 -> R18, live teacher", 8, "gpu")]
    assert live_gpu["images_per_s"] == pytest.approx(8 / (1 / 6300 + 1 / 21000))  # step and decoding share the GPU
    cached = [p for p in P.project(rows) if p["run"].startswith("R50 -> R18, cached") and p["decode"] == "cpu"]
    assert [p["bound"] for p in cached] == ["CPU decoding", "CPU decoding"]
    assert not any(p["run"].startswith("SimCLR") for p in P.project(rows))  # not measured: not projected


def test_anchor_is_the_papers_26_minutes_per_epoch():
    assert P.anchor_hours() == pytest.approx(56.33, abs=0.01)  # 130 x 26 min
    assert P.hours(P.EPOCH_IMAGES / (26 * 60)) == pytest.approx(P.anchor_hours())


# ============ flags of the hours and main_job profiles ============
def exit_with(module, argv: list[str], capsys, caplog) -> tuple[int, str]:
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        run_cli(module.main, module.get_args_parser().parse_args(argv))
    return stop.value.code, capsys.readouterr().err + caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rows", "{missing}"], "--rows '{missing}' does not exist"),
        (["--rows", "{rows}", "--set", "cores_per_gpu=0"], "--set cores_per_gpu=0: expected a positive integer"),
        (
            ["--rows", "{rows}", "--set", "ddp_efficiency=1.5"],
            "--set ddp_efficiency=1.5: expected a fraction in (0, 1]",
        ),
        (["--rows", "{rows}", "{dir}"], "--rows '{dir}' is a folder"),
        (["--rows", "{rows}", "--summary", "{dir}"], "--summary '{dir}' is a folder; give the file to write"),
        (["--rows", "{not_rows}"], "is not a JSON list of rows"),
        (["--rows", "{no_steps}"], "have no step or data rows to project from"),
        ([], "the hours profile reads the rows of earlier runs: give --rows"),
    ],
)
def test_hours_profile_flag_mistakes(argv, message, tmp_path, capsys, caplog):
    paths = {"missing": str(tmp_path / "none.json"), "rows": str(tmp_path / "rows.json"), "dir": str(tmp_path),
             "not_rows": str(tmp_path / "obj.json"), "no_steps": str(tmp_path / "knn.json")}  # fmt: skip
    write_json(paths["rows"], rows_of(step_bf16=100.0))
    write_json(paths["not_rows"], {"stage": "step"})
    write_json(paths["no_steps"], rows_of(knn_ours=100.0))
    code, text = exit_with(B, ["hours", *[a.format(**paths) for a in argv]], capsys, caplog)
    assert code == 2 and message.format(**paths) in text and "Traceback" not in text


def test_hours_profile_writes_the_table(tmp_path, capsys):
    write_json(str(tmp_path / "rows.json"), rows_of(step_bf16=6000.0, data_cpu=4800.0))
    argv = ["hours", "--rows", str(tmp_path / "rows.json"), "--summary", str(tmp_path / "p.md")]
    B.main(B.get_args_parser().parse_args(argv))
    text = (tmp_path / "p.md").read_text()
    assert text in capsys.readouterr().out and "| R50 -> R18, live teacher | 1 | cpu | 6000 | 4800 |" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "train_gpu,fly"], "unknown stage(s) fly in --stages"),
        (["--json", "{file}/main_job.json"], "--json '{file}/main_job.json' lies under '{file}', which is a file"),
        (["--work_dir", "{file}", "--dry_run"], "--work_dir '{file}' is a file; give a folder"),
        *([] if torch.cuda.is_available() else [([], "needs a CUDA device; add --dry_run")]),
    ],
)
def test_main_job_profile_flag_mistakes(argv, message, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(
        "tools.bench.main_job.prepare", lambda *a: pytest.fail("work started before the flags were checked")
    )
    (tmp_path / "f").write_text("x")
    paths = {"file": str(tmp_path / "f")}
    argv = ["main_job", *[a.format(**paths) for a in argv]]
    code, text = exit_with(B, argv, capsys, caplog)
    assert code == 2 and message.format(**paths) in text and "Traceback" not in text
