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
epochs after the first, from ``logs/train_log.jsonl``).
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision

from data.synthetic import make_jpeg_folder
from models.io import atomic_save, read_json, safe_load, write_json
from tools.bench.harness import prepare_jpegs

log = logging.getLogger("simreg.main_job")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class JobSizes:
    """Sizes of the check. Defaults: one H100/H200 with a 16-core host, about 2.5 minutes (estimated)."""

    images: int = 4096  # generated JPEGs (the benchmark's GPU profile set)
    replicas: int = 2  # train/ links every file this many times: 8192 images, 32 steps per epoch
    val_images: int = 512
    jpeg_size: tuple[int, int] = (500, 375)
    image_size: int = 224
    resize_size: int = 256
    batch: int = 256
    workers: int = 16
    epochs: int = 4  # train_gpu and resume: 128 steps
    short_epochs: int = 2  # train_cpu and train_cached: 64 steps
    print_freq: int = 10
    ckpt_every: int = 10  # resume: mid-epoch checkpoints
    stop_after_lines: int = 5  # resume: SIGTERM after this many step log lines (epoch 2, step 20 of 32)
    teacher: str = "resnet50"
    student: str = "resnet18"
    ks: str = "1,20"
    device: str = "cuda"
    exact_resume: bool = False  # bit-for-bit equality expected (CPU)
    limits: dict = field(  # seconds per part (hang guards; the expected times are about half)
        default_factory=lambda: dict(
            data=60, train_gpu=45, train_cpu=40, resume=70, knn_torch=35, knn_faiss=25, cache=35, train_cached=40
        )  # fmt: skip
    )


SIZES = {
    "gpu": JobSizes(),
    # every part on the CPU at toy sizes (--decode gpu decodes on the CPU): the rehearsal of DRY=1
    "dry": JobSizes(
        images=16,
        replicas=1,
        val_images=10,  # one per class of the generated set
        jpeg_size=(64, 48),
        image_size=32,
        resize_size=36,
        batch=4,
        workers=1,
        epochs=3,
        short_epochs=1,
        print_freq=1,
        ckpt_every=2,
        stop_after_lines=6,
        teacher="resnet18",
        ks="1,4",
        device="cpu",
        exact_resume=True,
        limits=dict(
            data=120,
            train_gpu=180,
            train_cpu=160,
            resume=280,
            knn_torch=140,
            knn_faiss=100,
            cache=140,
            train_cached=160,
        ),  # fmt: skip
    ),  # fmt: skip
}


@dataclass
class Job:
    """The folders and files the parts share."""

    sizes: JobSizes
    work_dir: str
    log_path: str
    data: str = ""
    teacher: str = ""
    n_train: int = 0
    n_val: int = 0

    def exp(self, name: str) -> str:
        return os.path.join(self.work_dir, "runs", name)


# ============ running a part ============
def torchrun(*args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node 1`` with ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def run_logged(cmd: list[str], job: Job, limit_s: float, on_line: Callable[[str, subprocess.Popen], None] = None):
    """Run ``cmd`` from the repository root, its output appended to the job's log; (exit status, seconds).

    ``on_line(line, process)`` sees every output line. Past ``limit_s`` the process group is killed and the
    status is ``"timeout"``.
    """
    start = time.perf_counter()
    with open(job.log_path, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        deadline = start + limit_s
        for line in proc.stdout:  # a hang without output is caught by the wait below
            out.write(line)
            if on_line:
                on_line(line, proc)
            if time.perf_counter() > deadline:
                break
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            code = None
        if code is None or time.perf_counter() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
        out.write(f"[exit {code} after {time.perf_counter() - start:.1f} s]\n")
    return code, time.perf_counter() - start


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


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
    job.teacher = os.path.join(job.work_dir, f"teacher_{s.teacher}_random.pth")
    if not os.path.isfile(job.teacher):
        torch.manual_seed(0)
        atomic_save(getattr(torchvision.models, s.teacher)().state_dict(), job.teacher)
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

    code1, t1 = run_logged(cmd, job, s.limits[name] / 2, on_line)
    resumed = {"line": ""}

    def note_resume(line: str, _) -> None:
        if "resumed from" in line:
            resumed["line"] = line[line.find("resumed from") :]

    code2, t2 = run_logged(cmd, job, s.limits[name] / 2, note_resume)
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


def run_job(job: Job, parts: list[str], json_path: str) -> list[dict]:
    """The parts in order; ``json_path`` is rewritten after each one."""
    s, rows = job.sizes, []
    cache = os.path.join(job.work_dir, "runs", "cache", "teacher.npy")
    steps = {
        "data": lambda: prepare(job),
        "train_gpu": lambda: train_part(job, "train_gpu", "gpu", s.epochs),
        "train_cpu": lambda: train_part(job, "train_cpu", "cpu", s.short_epochs),
        "resume": lambda: resume_part(job),
        "knn_torch": lambda: knn_part(job, "torch"),
        "knn_faiss": lambda: knn_part(job, "faiss") if faiss_installed() else {"ok": True, "skipped": "no faiss"},
        "cache": lambda: cache_part(job),
        "train_cached": lambda: train_part(
            job, "train_cached", "gpu", s.short_epochs, "--use_cache", "--teacher_feats", cache
        ),  # fmt: skip
    }
    for name in parts:
        log.info("main job: %s", name)
        start = time.perf_counter()
        try:
            row = steps[name]()
        except Exception as exc:  # one broken part must not cost the call the others
            log.exception("part %s failed", name)
            row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append({"part": name, "wall_s": round(time.perf_counter() - start, 1), **row})
        write_json(json_path, rows)
        log.info("main job: %s %s", name, "ok" if row.get("ok") else "FAILED")
    return rows


def faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


PARTS = ("data", "train_gpu", "train_cpu", "resume", "knn_torch", "knn_faiss", "cache", "train_cached")
