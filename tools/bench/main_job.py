"""The main job, for real, on one device: what ``tools/gpu_check.sh`` runs besides the tests and the benchmark.

Parts, in order (each with its own time limit; a part that fails or runs out of time is recorded and
the others still run):
- ``data``: generated JPEGs (the benchmark's set, reused) linked ``replicas`` times as ``train/`` (longer
  epochs without generating more files), a ``val/`` set, a randomly initialised teacher file;
- ``train_gpu``: ``torchrun --nproc_per_node 1 train_student.py`` with bf16, channels_last, ``--decode gpu``;
- ``train_cpu``: the same with ``--decode cpu`` (the loader workers decode);
- ``resume``: ``train_gpu``'s command with ``--ckpt_every_steps``, stopped by SIGTERM mid-run (it saves and
  exits), then run again: it must resume mid-epoch and end where ``train_gpu`` ended (bit for bit on a
  CPU; on a GPU, cuDNN's algorithm choice lets the weights differ within float tolerance);
- ``knn_torch``, ``knn_faiss``: ``eval_knn.py`` on ``train_gpu``'s result (faiss when installed, reusing
  the features, so its time is the search);
- ``cache``: ``tools.cache_teacher_features``; ``train_cached``: ``train_student.py --use_cache``.
Every part records its command, exit status, seconds and images/s (training: the median over the
epochs after the first, from ``logs/train_log.jsonl``). Each command runs under the hang guard of
:mod:`tools.bench.guard` (killed with every process it started past its limit, silent or not); the
profile's process, stopped by an outer limit, kills the command still running before it exits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from data.synthetic import make_jpeg_folder
from models.io import read_json, safe_load
from tools.bench.guard import Guard, children
from tools.bench.harness import Context, prepare_jpegs, random_teacher_file
from tools.eval.knn import faiss_module

log = logging.getLogger("simreg.main_job")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Job:
    """The folders and files the parts share."""

    sizes: object  # the profile's sizes (tools.bench.profiles: MAIN_JOB)
    work_dir: str
    log_path: str
    data: str = ""
    teacher: str = ""
    n_train: int = 0
    n_val: int = 0
    guard: Guard = field(default_factory=Guard)

    def exp(self, name: str) -> str:
        return os.path.join(self.work_dir, "runs", name)


# ============ running a part ============
def torchrun(*args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node 1`` with ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def run_logged(cmd: list[str], job: Job, limit_s: float, on_line: Callable[[str, subprocess.Popen], None] = None):
    """Run ``cmd`` from the repository root under the job's guard, its output appended to the job's log;
    (exit status or ``"timeout"``, seconds). ``on_line(line, process)`` sees every output line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return job.guard.run(cmd, limit_s, job.log_path, on_line, cwd=ROOT, env=env)


# ============ the parts ============
def prepare(job: Job) -> dict:
    """Train and val JPEG folders and a random teacher file."""
    s = job.sizes
    made = prepare_jpegs(job.work_dir, s.images, s.jpeg_size, s.workers)
    src = os.path.join(made["root"], "train")
    job.data = os.path.join(job.work_dir, f"main_job_data_{s.images}x{s.replicas}")
    train = os.path.join(job.data, "train")
    for cls in sorted(os.listdir(src)):  # links: longer epochs, the same files' decoding cost
        os.makedirs(os.path.join(train, cls), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(src, cls))):
            for r in range(s.replicas):
                link = os.path.join(train, cls, f"r{r}_{name}")
                if not os.path.lexists(link):
                    os.symlink(os.path.join(src, cls, name), link)
    val_root = os.path.join(job.work_dir, f"val_{s.val_images}_{s.jpeg_size[0]}x{s.jpeg_size[1]}")
    make_jpeg_folder(val_root, s.val_images, size=s.jpeg_size, seed=1, processes=max(1, min(s.workers, 16)))
    val = os.path.join(job.data, "val")
    if os.path.lexists(val) and os.readlink(val) != os.path.join(val_root, "train"):
        os.remove(val)  # a val set of another size from an earlier run
    if not os.path.lexists(val):
        os.symlink(os.path.join(val_root, "train"), val)
    job.teacher = random_teacher_file(job.work_dir, s.teacher)
    job.n_train, job.n_val = s.images * s.replicas, s.val_images
    return {"ok": True, "train_images": job.n_train, "val_images": job.n_val, "jpeg_kb": made["mean_kb"]}


def train_cmd(job: Job, name: str, decode: str, epochs: int, *extra: str) -> list[str]:
    s = job.sizes
    return torchrun("train_student.py", job.data, "--teacher_weights", job.teacher, "--arch_student", s.student,
                    "--image_size", str(s.image_size), "--batch_size", str(s.batch), "--epochs", str(epochs),
                    "--num_workers", str(s.workers), "--single_aug", "--weak_weak", "--amp", "bf16",
                    "--channels_last", "--decode", decode, "--device", s.device, "--print_freq", str(s.print_freq),
                    "--exp_dir", job.exp(name), *extra)  # fmt: skip


def epoch_rates(exp_dir: str) -> dict:
    """From ``logs/train_log.jsonl``: per-epoch images/s, their median after the first epoch, the last loss."""
    path = os.path.join(exp_dir, "logs", "train_log.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        lines = [json.loads(ln) for ln in f if ln.strip()]
    rates = [ln["images_per_s"] for ln in lines]
    steady = rates[1:] or rates  # the first epoch pays worker start-up and cuDNN's algorithm search
    return {"epochs": len(lines), "epoch_images_per_s": rates, "images_per_s": statistics.median(steady),
            "final_loss": lines[-1]["loss"], "cpu_decoded_images": lines[-1].get("cpu_decoded_images")}  # fmt: skip


def train_part(job: Job, name: str, decode: str, epochs: int, *extra: str) -> dict:
    shutil.rmtree(job.exp(name), ignore_errors=True)  # a fresh run each time (an old one would be resumed)
    code, seconds = run_logged(train_cmd(job, name, decode, epochs, *extra), job, job.sizes.limits[name])
    return {"ok": code == 0, "rc": code, "seconds": seconds, "decode": decode, **epoch_rates(job.exp(name))}


def final_weights(exp_dir: str) -> dict[str, torch.Tensor]:
    ckpt = safe_load(os.path.join(exp_dir, "checkpoints", "checkpoint_latest.pth"), "checkpoint")
    return {
        **{f"student.{k}": v for k, v in ckpt["student"].items()},
        **{f"head.{k}": v for k, v in ckpt["head"].items()},
    }


def compare_runs(a: str, b: str) -> dict:
    """Whether two runs ended with equal weights, and the largest relative difference of a tensor."""
    wa, wb = final_weights(a), final_weights(b)
    worst = max(((wa[k].double() - wb[k].double()).norm() / wa[k].double().norm().clamp_min(1e-12)).item()
                for k in wa if wa[k].is_floating_point())  # fmt: skip
    return {"weights_equal": all(torch.equal(wa[k], wb[k]) for k in wa), "max_rel_tensor_diff": worst}


RESUME_FIRST_SHARE = 0.55  # of the resume part's limit, for the run that is stopped


def resume_part(job: Job) -> dict:
    """Stop train_gpu's run by SIGTERM after ``stop_after_lines`` step logs, rerun it, compare with train_gpu."""
    s, name = job.sizes, "resume"
    shutil.rmtree(job.exp(name), ignore_errors=True)
    cmd = train_cmd(job, name, "gpu", s.epochs, "--ckpt_every_steps", str(s.ckpt_every))
    seen = {"lines": 0, "signalled": False}

    def on_line(line: str, proc: subprocess.Popen) -> None:
        if " step " in line and " loss " in line and not seen["signalled"]:
            seen["lines"] += 1
            if seen["lines"] == s.stop_after_lines:  # the rank process saves at its next step and exits 0
                for pid in children(proc.pid) or [proc.pid]:
                    os.kill(pid, signal.SIGTERM)
                seen["signalled"] = True

    code1, t1 = run_logged(cmd, job, RESUME_FIRST_SHARE * s.limits[name], on_line)
    resumed = {"line": ""}

    def note_resume(line: str, _) -> None:
        if "resumed from" in line:
            resumed["line"] = line[line.find("resumed from") :]

    code2, t2 = run_logged(cmd, job, s.limits[name] - t1, note_resume)  # the first run's leftover too
    out = {"rc": [code1, code2], "seconds": t1 + t2, "signalled": seen["signalled"], "resumed": resumed["line"].strip()}
    out.update(epoch_rates(job.exp(name)))
    if code1 == 0 and code2 == 0 and os.path.isdir(job.exp("train_gpu")):
        out.update(compare_runs(job.exp("train_gpu"), job.exp(name)))
        reference = epoch_rates(job.exp("train_gpu")).get("final_loss")
        out["reference_final_loss"] = reference
        mid_epoch = "steps into the next" in out["resumed"] and " 0 steps into" not in out["resumed"]
        close = reference is not None and abs(out["final_loss"] - reference) <= 0.05 * reference
        out["ok"] = mid_epoch and out["epochs"] == s.epochs and (out["weights_equal"] or not s.exact_resume) and close
    else:
        out["ok"] = False
    return out


def knn_part(job: Job, backend: str) -> dict:
    s = job.sizes
    features = os.path.join(job.exp("train_gpu"), "features")
    cmd = torchrun("eval_knn.py", job.data, "--exp_dir", job.exp("train_gpu"), "--backend", backend, "-k", s.ks,
                   "--resize_size", str(s.resize_size), "--crop_size", str(s.image_size), "--batch-size",
                   str(s.batch), "-j", str(s.workers), "--device", s.device)  # fmt: skip
    if backend == "faiss":
        cmd.append("--use_cache")  # the torch part's features: this part times the search
    code, seconds = run_logged(cmd, job, s.limits[f"knn_{backend}"])
    results = read_json(os.path.join(features, "knn_results.json")) or {}
    out = {"ok": code == 0 and bool(results), "rc": code, "seconds": seconds, "backend": results.get("backend")}
    if results:
        out["script_s"] = results["time_s"]
        out["top1_majority"] = {k: v["majority"]["top1"] for k, v in results["k"].items()}
        if backend == "torch":  # features of every train and val image, then the search
            out["images_per_s"] = (job.n_train + job.n_val) / results["time_s"]
    return out


def cache_part(job: Job) -> dict:
    s = job.sizes
    out_npy = os.path.join(job.work_dir, "runs", "cache", "teacher.npy")
    cmd = torchrun("-m", "tools.cache_teacher_features", job.data, "--teacher_weights", job.teacher, "--out",
                   out_npy, "--resize_size", str(s.resize_size), "--crop_size", str(s.image_size), "--batch_size",
                   str(s.batch), "--num_workers", str(s.workers), "--device", s.device, "--overwrite")  # fmt: skip
    for path in (out_npy, out_npy[:-4] + ".json"):  # a fresh build each time
        if os.path.exists(path):
            os.remove(path)
    code, seconds = run_logged(cmd, job, s.limits["cache"])
    return {"ok": code == 0 and os.path.isfile(out_npy), "rc": code, "seconds": seconds,
            "images_per_s": job.n_train / seconds, "note": "images/s over the whole command (start-up included)",
            "cache": out_npy}  # fmt: skip


def job_of(p, ctx: Context) -> Job:
    """The run's job: its folders, and its data and teacher prepared once, whichever part comes first.

    The log of every command goes beside the JSON rows (``main_job.json`` -> ``main_job.log``).
    """
    if "job" not in ctx.shared:
        log_path = os.path.join(ctx.work_dir, "main_job.log")
        if ctx.json_path:
            log_path = os.path.splitext(ctx.json_path)[0] + ".log"
        job = Job(p, os.path.abspath(ctx.work_dir), log_path)
        job.guard.install()  # stopped from outside: no command left running on the GPU
        ctx.shared["job"], ctx.shared["job_data"] = job, prepare(job)
    return ctx.shared["job"]


def part(run: Callable[[Job], dict]) -> Callable[[object, Context], list[dict]]:
    """A part of the job as a benchmark stage: one row, ``ok`` saying whether it came out right."""

    def stage(p, ctx: Context) -> list[dict]:
        return [{"config": "the main job", **run(job_of(p, ctx))}]

    return stage


def train_cached(job: Job) -> dict:
    cache = os.path.join(job.work_dir, "runs", "cache", "teacher.npy")
    return train_part(job, "train_cached", "gpu", job.sizes.short_epochs, "--use_cache", "--teacher_feats", cache)


def knn_faiss(job: Job) -> dict:
    return knn_part(job, "faiss") if faiss_module() is not None else {"ok": True, "skipped": "no faiss"}


def data_part(p, ctx: Context) -> list[dict]:
    job_of(p, ctx)
    return [{"config": "the main job", **ctx.shared["job_data"]}]


STAGES = {
    "data": data_part,
    "train_gpu": part(lambda job: train_part(job, "train_gpu", "gpu", job.sizes.epochs)),
    "train_cpu": part(lambda job: train_part(job, "train_cpu", "cpu", job.sizes.short_epochs)),
    "resume": part(resume_part),
    "knn_torch": part(lambda job: knn_part(job, "torch")),
    "knn_faiss": part(knn_faiss),
    "cache": part(cache_part),
    "train_cached": part(train_cached),
}


def format_job_table(rows: list[dict]) -> str:
    """One line per part: whether it came out right, seconds, images/s, what went wrong or was noted."""
    lines = [f"\n{'part':<13} {'ok':<5} {'seconds':>8} {'images/s':>9}  notes"]
    for r in rows:
        rate = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "-"
        ok = bool(r.get("ok")) and not r.get("failed")
        notes = r["note"] if r.get("failed") else r.get("skipped") or r.get("resumed") or ""
        lines.append(f"{r['stage']:<13} {str(ok):<5} {r['stage_s']:>8.1f} {rate:>9}  {notes[:70]}")
    return "\n".join(lines) + "\n"
