"""The GPU check: one call on a GPU machine runs the GPU tests, the main job for real, the GPU timings and the
hours they imply, in at most 8 minutes on one H100/H200 (``bash tools/gpu_check.sh`` runs this command).

    python -m tools.gpu_check             # results in $OUT (the device tool sets it), else /tmp/gpu_check
    python -m tools.gpu_check --dry_run   # (DRY=1) the rehearsal on any machine: every part on the CPU, toy sizes

Parts, in order (:data:`PARTS`), each a command run under the hang guard of :mod:`tools.bench.guard`
(killed with every process it started once past its limit, silent or not):

- ``env``: the card, driver, versions, cores, disk, which optional packages are there;
- ``gpu_tests``: the tests marked ``gpu`` (device decoding, the prefetch streams, the fast step), not
  the compiled one;
- ``main_job``: ``python -m tools.benchmark main_job`` (torchrun training with GPU and CPU decoding, a
  stop and exact resume, k-NN, a cached-teacher run), its own parts' limits inside this one's;
- ``bench_gpu``: ``python -m tools.benchmark gpu`` at the sizes of :data:`GPU_CHECK_SIZES`, not compiled;
- ``compile`` (optional): the compiled step (the GPU test and the benchmark's row), with whatever time the
  other parts left; cut, not failed, when too little is left;
- ``hours``: ``python -m tools.benchmark hours`` from the rows above.

The required parts' limits add up to :data:`TOTAL_S` (tests/test_gpu_check.py checks the arithmetic).
``$OUT`` gets at most 8 files (what the device tool brings back): ``summary.md`` and ``summary.json``
(which parts ran, their figures, which were cut and why; rewritten after every part), ``gpu_check.log``
(every part's output), ``main_job.json`` / ``main_job.log``, ``bench_gpu.json``, ``bench_compile.json``
and ``projection.md``. Exit status 0 when every required part came out right.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from tools.bench.guard import Guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_S = {"gpu": 480, "dry": 1500}  # the whole check: 8 minutes on one GPU; the CPU rehearsal on 2 shared cores
MIN_OPTIONAL_S = {"gpu": 45, "dry": 120}  # an optional part not worth starting with less
MAIN_JOB_STAGES = ("data", "train_gpu", "train_cpu", "resume", "knn_torch", "cache", "train_cached")
# The main job's part: the sum of its stages' own limits (the main_job profile's, tools/bench/profiles.py) and
# 20 s for the profile's own start; the sums are checked by tests/test_gpu_check.py (this command never
# imports torch itself, so its clock is spent on the parts).
MAIN_JOB_LIMIT_S = {"gpu": 245, "dry": 710}
FAISS_STAGE_S = {"gpu": 20, "dry": 90}  # knn_faiss, added (to the stages and the limit) where faiss is installed
# The gpu profile in the check: its stages at smaller sizes (the full ImageNet-size caches are 7.4 GB to write).
GPU_CHECK_SIZES = ("compile=no", "images=2048", "cache_rows=262144", "x4_rows=32768", "knn_train=262144",
                   "probe_rows=262144")  # fmt: skip
ENV_CODE = """
import json, os, platform, shutil, subprocess, sys, importlib.util
import torch, torchvision
info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda, "cpu_cores": len(os.sched_getaffinity(0)),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "optional": {m: importlib.util.find_spec(m) is not None
                     for m in ("faiss", "nvidia.dali", "timm", "transformers")},
        "disk_free_gb": round(shutil.disk_usage(sys.argv[2]).free / 2**30, 1),
        "shm_free_gb": round(shutil.disk_usage("/dev/shm").free / 2**30, 1) if os.path.isdir("/dev/shm") else None}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
except (OSError, subprocess.SubprocessError) as exc:
    info["nvidia_smi"] = f"not available ({exc})"
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"))
"""


@dataclass
class Check:
    """Where the check writes, how it runs, and what its parts did so far."""

    out: str
    work: str
    dry: bool
    python: str = sys.executable
    start: float = field(default_factory=time.monotonic)
    results: list = field(default_factory=list)

    @property
    def mode(self) -> str:
        return "dry" if self.dry else "gpu"

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)


# ============ the parts ============
def bench(c: Check, *args: str) -> list[str]:
    return [c.python, "-m", "tools.benchmark", *args, "--work_dir", c.work, *(["--dry_run"] if c.dry else [])]


def pytest_cmd(c: Check, select: str, xml: str, *files: str) -> list[str]:
    return [c.python, "-m", "pytest", "-q", "-m", "gpu", "-k", select, "-p", "no:cacheprovider",
            f"--junitxml={os.path.join(c.work, xml)}", "--basetemp", os.path.join(c.work, "pytest"),
            *files]  # fmt: skip


GPU_TEST_FILES = ("tests/test_device_decode.py", "tests/test_prefetch.py", "tests/test_teacher_cache.py",
                  "tests/test_fast_step.py")  # fmt: skip


def main_job_stages() -> list[str]:
    stages = list(MAIN_JOB_STAGES)
    if importlib.util.find_spec("faiss") is not None:
        stages.insert(stages.index("cache"), "knn_faiss")
    return stages


def main_job_cmds(c: Check) -> list[list[str]]:
    return [bench(c, "main_job", "--json", c.path("main_job.json"), "--stages", ",".join(main_job_stages()))]


def check_sizes(c: Check, *leave_out: str) -> list[str]:
    """``--set`` flags of :data:`GPU_CHECK_SIZES` (none in the rehearsal: its toy sizes are smaller still)."""
    chosen = [] if c.dry else [s for s in GPU_CHECK_SIZES if s.split("=")[0] not in leave_out]
    return [w for s in chosen for w in ("--set", s)]


def bench_gpu_cmds(c: Check) -> list[list[str]]:
    return [bench(c, "gpu", "--json", c.path("bench_gpu.json"), *check_sizes(c))]


def compile_cmds(c: Check) -> list[list[str]]:
    sizes = check_sizes(c, "compile")
    compiled = ["--stages", "step", "--set", "compile=yes", *sizes, "--json", c.path("bench_compile.json")]
    return [pytest_cmd(c, "compiled", "compile_tests.xml", "tests/test_fast_step.py"), bench(c, "gpu", *compiled)]


def hours_cmds(c: Check) -> list[list[str]]:
    rows = [c.path(n) for n in ("bench_gpu.json", "main_job.json", "bench_compile.json") if os.path.isfile(c.path(n))]
    return [[c.python, "-m", "tools.benchmark", "hours", "--rows", *rows, "--summary", c.path("projection.md")]]


PARTS: list[dict] = [  # limits in seconds: on one GPU, and in the CPU rehearsal
    {"name": "env", "limits": {"gpu": 20, "dry": 60},
     "cmds": lambda c: [[c.python, "-c", ENV_CODE, os.path.join(c.work, "env.json"), c.work]]},
    {"name": "gpu_tests", "limits": {"gpu": 70, "dry": 120},
     "cmds": lambda c: [pytest_cmd(c, "not compiled", "gpu_tests.xml", *GPU_TEST_FILES)]},
    {"name": "main_job", "limits": None, "cmds": main_job_cmds},  # its parts' limits (profiles.py) + a margin
    {"name": "bench_gpu", "limits": {"gpu": 110, "dry": 400}, "cmds": bench_gpu_cmds},
    {"name": "compile", "limits": None, "optional": True, "cmds": compile_cmds},  # what the others left
    {"name": "hours", "limits": {"gpu": 15, "dry": 60}, "cmds": hours_cmds},
]  # fmt: skip


def part_limit(part: dict, mode: str, faiss: bool = False) -> int | None:
    """A part's own limit in seconds (None: the optional part, which takes what is left)."""
    if part["name"] == "main_job":
        return MAIN_JOB_LIMIT_S[mode] + (FAISS_STAGE_S[mode] if faiss else 0)
    return part["limits"][mode] if part["limits"] else None


def granted(index: int, left: float, mode: str, faiss: bool = False, parts: list[dict] = PARTS) -> float:
    """Seconds part ``index`` may run when ``left`` seconds of the total remain: its own limit, or less so that
    every required part after it still gets its own; the optional part gets all that this leaves. <= 0: cut.
    ``faiss``: the main job has its faiss stage too."""
    reserved = sum(part_limit(p, mode, faiss) for p in parts[index + 1 :] if not p.get("optional"))
    own = part_limit(parts[index], mode, faiss)
    available = left - reserved
    return available if own is None else min(own, available)


# ============ running and reporting ============
def run_part(c: Check, index: int, guard: Guard) -> dict:
    part = PARTS[index]
    left = TOTAL_S[c.mode] - (time.monotonic() - c.start)
    limit = granted(index, left, c.mode, "knn_faiss" in main_job_stages())
    row = {"part": part["name"], "limit_s": round(limit, 1), "optional": bool(part.get("optional"))}
    too_little = MIN_OPTIONAL_S[c.mode] if part.get("optional") else 1
    if limit < too_little:
        return {**row, "status": "cut", "seconds": 0.0, "note": f"cut: {max(limit, 0):.0f} s left for it"}
    status, seconds, codes = "ok", 0.0, []
    for cmd in part["cmds"](c):
        code, took = guard.run(cmd, limit - seconds, c.path("gpu_check.log"), cwd=ROOT, env=child_env(c))
        seconds, codes = seconds + took, [*codes, code]
        if code != 0:
            status = "timeout" if code == "timeout" else "failed"
            break
    note = {"timeout": f"killed at its limit of {limit:.0f} s", "failed": f"exit status {codes[-1]}"}.get(status, "")
    row.update(status=status, seconds=round(seconds, 1), exit=codes, note=note)
    row["figures"] = figures(c, part["name"])
    if status == "ok" and row["figures"].get("ok") is False:
        row.update(status="failed", note=row["figures"].get("why", "its results say it did not come out right"))
    return row


def child_env(c: Check) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if c.dry:  # several processes on a few CPU cores; no GPU even where there is one
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def junit_counts(path: str) -> dict:
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def figures(c: Check, name: str) -> dict:
    """What a part measured or found, read back from the files it wrote."""
    if name == "env":
        return read(os.path.join(c.work, "env.json")) or {}
    if name in ("gpu_tests", "compile"):
        xml = "gpu_tests.xml" if name == "gpu_tests" else "compile_tests.xml"
        out = {"tests": junit_counts(os.path.join(c.work, xml))}
        if name == "compile":
            out["rates"] = rates(read(c.path("bench_compile.json")) or [], ("step.",))
        return out
    if name == "main_job":
        rows = read(c.path("main_job.json")) or []
        parts = {r["stage"]: {"ok": bool(r.get("ok")) and not r.get("failed"), "seconds": r.get("stage_s"),
                              "images_per_s": _round(r.get("images_per_s"))} for r in rows}  # fmt: skip
        bad = [s for s, p in parts.items() if not p["ok"]]
        return {"parts": parts, "ok": not bad, "why": f"main job part(s) {', '.join(bad)} did not come out right"}
    if name == "bench_gpu":
        rows = read(c.path("bench_gpu.json")) or []
        failed = sorted({r["stage"] for r in rows if r.get("failed")})
        return {"rates": rates(rows), "ok": not failed, "why": f"benchmark stage(s) {', '.join(failed)} failed"}
    if name == "hours":
        return {"projection": c.path("projection.md") if os.path.isfile(c.path("projection.md")) else None}
    return {}


def rates(rows: list[dict], prefixes: tuple[str, ...] = ("",)) -> dict:
    """``{row key: images (or queries, rows) per second}`` of the timing rows."""
    return {r["key"]: _round(r["img_s"]) for r in rows if r.get("img_s") and r.get("key", "").startswith(prefixes)}


def _round(x):
    return round(x, 1) if isinstance(x, (int, float)) else x


def write_summary(c: Check, done: bool) -> None:
    """summary.json and summary.md: the parts so far (all of them once ``done``)."""
    ran = {r["part"] for r in c.results}
    pending = [{"part": p["name"], "status": "not reached"} for p in PARTS if p["name"] not in ran]
    summary = {"mode": c.mode, "total_limit_s": TOTAL_S[c.mode], "elapsed_s": round(time.monotonic() - c.start, 1),
               "finished": done, "parts": c.results + pending}  # fmt: skip
    with open(c.path("summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(c.path("summary.md"), "w") as f:
        f.write(summary_text(summary))


def summary_text(summary: dict) -> str:
    env = next((r.get("figures", {}) for r in summary["parts"] if r["part"] == "env"), {})
    versions = f"torch {env.get('torch', '?')}, torchvision {env.get('torchvision', '?')}, CUDA {env.get('cuda', '?')}"
    lines = [f"# GPU check ({summary['mode']}): {summary['elapsed_s']:.0f} s of {summary['total_limit_s']} s"
             + ("" if summary["finished"] else " (still running)"), "",
             f"{env.get('device', '?')} | {env.get('nvidia_smi', '')} | {env.get('cpu_cores', '?')} CPU cores | "
             f"{versions}", "", "| part | status | seconds | limit | figures / note |",
             "| --- | --- | ---: | ---: | --- |"]  # fmt: skip
    for r in summary["parts"]:
        shown = r.get("note") or short(r.get("figures", {}), r["part"])
        lines.append(f"| {r['part']} | {r['status']} | {r.get('seconds', '')} | {r.get('limit_s', '')} | {shown} |")
    cut = [r["part"] for r in summary["parts"] if r["status"] in ("cut", "timeout", "not reached")]
    lines += ["", f"Cut or not reached: {', '.join(cut) if cut else 'none'}."]
    return "\n".join(lines) + "\n"


def short(fig: dict, part: str) -> str:
    """One cell's worth of a part's figures."""
    if "tests" in fig and fig["tests"]:
        t = fig["tests"]
        shown = f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
        return "; ".join([shown, *(f"{k} {v}/s" for k, v in fig.get("rates", {}).items())])
    if "parts" in fig:
        return "; ".join(f"{s} {'ok' if p['ok'] else 'FAILED'} {p['seconds']} s"
                         + (f" {p['images_per_s']:.0f}/s" if p.get("images_per_s") else "")
                         for s, p in fig["parts"].items())  # fmt: skip
    if "rates" in fig:
        keys = ("step.bf16", "step.fp32", "data.gpu", "e2e.gpu", "e2e.cpu", "cached.mmap", "knn.ours")
        return ", ".join(f"{k} {fig['rates'][k]:.0f}/s" for k in keys if k in fig["rates"])
    if part == "env":
        return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in fig.get("optional", {}).items())
    return str(fig.get("projection") or "")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("GPU check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry_run", action="store_true", default=bool(os.environ.get("DRY")),
                   help="the rehearsal: every part on the CPU at toy sizes (default when DRY is set)")  # fmt: skip
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check", help="results ($OUT)")
    p.add_argument("--work", default=os.environ.get("WORK") or "/tmp/simreg_bench", help="generated data ($WORK)")
    return p


def main(args: argparse.Namespace) -> int:
    c = Check(os.path.abspath(args.out), os.path.abspath(args.work), args.dry_run)
    os.makedirs(c.out, exist_ok=True)
    os.makedirs(c.work, exist_ok=True)
    guard = Guard().install()  # stopped from outside: the part running is killed with everything it started
    for index in range(len(PARTS)):
        row = run_part(c, index, guard)
        c.results.append(row)
        write_summary(c, done=False)
        print(f"[gpu_check] {row['part']}: {row['status']} ({row.get('seconds', 0)} s) {row.get('note', '')}",
              flush=True)  # fmt: skip
    write_summary(c, done=True)
    print(open(c.path("summary.md")).read(), end="")
    failed = [r["part"] for r in c.results if r["status"] != "ok" and not r["optional"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
