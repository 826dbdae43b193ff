"""Running the study: teachers, feature caches and student runs as the project's own commands, then
each student evaluated under the same protocol; every result written atomically as it finishes.

Layout under the study folder ``OUT``::

    teachers/<name>.pth                   the demo teachers (tools.pretrain_teacher), or the user's files
    caches/<name>_centre.npy              centre-crop teacher features (tools.cache_teacher_features)
    caches/<name>_kview<K>_seed<S>.npy    the exact K-view cache of one seed
    runs/<config>/seed<S>/                a train_student.py experiment folder, and its result.json
    references/<network>/                 teachers and random-init students under the same protocol

A finished run has ``result.json``; a rerun skips it. An interrupted training resumes from its own
latest checkpoint (train_student.py's default).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from data.demo import make_seg_dataset
from models.errors import UserError
from models.io import read_json, write_json
from tools.eval_summary import read_losses
from tools.study.evaluate import evaluate, network, segmentation
from tools.study.grid import VIEWS, RunConfig, Scale

log = logging.getLogger("simreg.reproduce")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT = "result.json"


@dataclass(frozen=True)
class Teacher:
    """A teacher of the study: its file and architecture; ``seed`` trains the demo teacher when absent."""

    name: str
    arch: str
    weights: str
    seed: int = 0
    data: str = "digits"  # what the demo teacher is trained on (segdemo: teacher S of the dense row)


@dataclass
class Study:
    """Where the study lives and how it runs (no flags are read below this object)."""

    out: str
    data: str
    scale: Scale
    teachers: dict[str, Teacher]
    threads: int = 1
    knn_every: int = 1  # the paper's setting logs k-NN curves every N epochs
    paper: RunConfig | None = None
    runs_folder: str = "runs"  # "verify" for a fresh rerun checked against the records (tools/study/verify.py)
    _eval_lock: threading.Lock = field(default_factory=threading.Lock)

    def run_dir(self, run: RunConfig, seed: int) -> str:
        return os.path.join(self.out, self.runs_folder, run.key(), f"seed{seed}")

    def data_of(self, data: str) -> str:
        """The dataset root of ``data``: the study's (``digits``), or the segmentation demo, written on first use
        under ``OUT/demo_seg``."""
        if data == "digits":
            return self.data
        return make_seg_dataset(os.path.join(self.out, "demo_seg"))

    def size_of(self, data: str) -> int:
        """The crop size of the runs on ``data``."""
        return self.scale.image_size if data == "digits" else self.scale.dense_size


def command(module_or_script: str, *argv: str) -> list[str]:
    """``python <script>`` or ``python -m <module>`` with ``argv``, as strings."""
    head = (
        [sys.executable, module_or_script]
        if module_or_script.endswith(".py")
        else [sys.executable, "-m", module_or_script]
    )
    return head + [str(a) for a in argv]


def run_command(cmd: list[str], log_path: str, threads: int) -> None:
    """Run one project command (cwd: the repository) with its output in ``log_path``; fail loudly."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise UserError(f"'{' '.join(cmd[1:4])} ...' failed (exit {done.returncode}); its output is in {log_path}")


# ---------------------------------------------------------------- teachers and caches
def prepare_teacher(study: Study, t: Teacher) -> None:
    """Train the demo teacher ``t`` (supervised, torchvision layout) unless its file exists."""
    if os.path.isfile(t.weights):
        return
    s = study.scale
    epochs = s.teacher_epochs if t.data == "digits" else s.dense_teacher_epochs
    cmd = command("tools.pretrain_teacher", study.data_of(t.data), "--arch", t.arch, "--epochs", epochs,
                  "--batch_size", s.batch_size, "--optimizer", "adamw", "--learning_rate", s.teacher_lr,
                  "--image_size", study.size_of(t.data),
                  "--num_workers", 0, "--seed", t.seed, "--out", t.weights)  # fmt: skip
    log.info("training teacher %s (%s, seed %d)", t.name, t.arch, t.seed)
    run_command(cmd, os.path.join(study.out, "teachers", f"{t.name}.log"), study.threads)


def cache_path(study: Study, teacher: str, cache: str, seed: int) -> str:
    k = study.scale.epochs
    name = f"{teacher}_centre.npy" if cache == "centre" else f"{teacher}_kview{k}_seed{seed}.npy"
    return os.path.join(study.out, "caches", name)


def prepare_cache(study: Study, run: RunConfig, teacher: str, seed: int) -> str:
    """The teacher feature cache ``run`` trains on (built once; the K-view cache once per seed)."""
    path = cache_path(study, teacher, run.cache, seed)
    if os.path.isfile(path) and os.path.isfile(path[:-4] + ".json"):
        return path
    t, s = study.teachers[teacher], study.scale
    argv = [study.data, "--arch_teacher", t.arch, "--teacher_weights", t.weights, "--resize_size", s.image_size,
            "--crop_size", s.image_size, "--batch_size", 256, "--num_workers", 0, "--device", "cpu",
            "--out", path]  # fmt: skip
    if run.cache == "kview":  # the training crops of epochs 1..K, drawn as train_student.py --seed draws them
        argv += ["--views", s.epochs, "--seed", seed, "--image_size", s.image_size, *VIEWS[run.views]]
    run_command(command("tools.cache_teacher_features", *argv), path[:-4] + ".log", study.threads)
    return path


# ---------------------------------------------------------------- student runs
def train_argv(study: Study, run: RunConfig, seed: int) -> list[str]:
    """train_student.py's flags for ``run`` with ``seed`` (caches built first)."""
    s, teachers = study.scale, [study.teachers[n] for n in run.teachers]
    epochs = s.epochs if run.data == "digits" else s.dense_epochs
    argv = [study.data_of(run.data), "--arch_teacher", *(t.arch for t in teachers),
            "--teacher_weights", *(t.weights for t in teachers),
            "--arch_student", run.student, "--n_mlp_layers", run.head, *VIEWS[run.views],
            "--image_size", study.size_of(run.data), "--epochs", epochs, "--batch_size", s.batch_size,
            "--learning_rate", s.lr, "--save_freq", epochs, "--print_freq", 1000, "--num_workers", 0,
            "--device", "cpu", "--seed", seed, "--exp_dir", study.run_dir(run, seed)]  # fmt: skip
    if run.loss != "global":
        argv += ["--loss", run.loss]
    if run.cache != "live":
        argv += ["--use_cache", "--teacher_feats", *(prepare_cache(study, run, n, seed) for n in run.teachers)]
    if run == study.paper and study.knn_every:
        argv += ["--knn_every", study.knn_every, "--knn_resize_size", s.image_size]
    return [str(a) for a in argv]


def run_student(study: Study, run: RunConfig, seed: int, pred: bool) -> dict:
    """Train (or resume) one student and evaluate it; returns and writes its ``result.json``."""
    folder = study.run_dir(run, seed)
    done = read_json(os.path.join(folder, RESULT))
    if done is not None and (not pred or "pred" in done):
        log.info("skipping finished run %s seed %d", run.key(), seed)
        return done
    start = time.perf_counter()
    argv = train_argv(study, run, seed)
    run_command(command("train_student.py", *argv), os.path.join(folder, "train.out"), study.threads)
    train_s = time.perf_counter() - start
    weights = os.path.join(folder, "checkpoints", "checkpoint_latest.pth")
    s, data, size = study.scale, study.data_of(run.data), study.size_of(run.data)
    with study._eval_lock:  # evaluations run in this process, one at a time
        result = {"config": asdict(run), "seed": seed, "train_s": round(train_s, 1), "losses": read_losses(folder)}
        model = network("student", weights, run.student)
        result["backbone"] = evaluate(model, data, size, os.path.join(folder, "features"), s.probe_epochs)
        if run.data == "segdemo":  # the dense row: the linear segmentation probe too
            result["backbone"].update(segmentation(model, data, os.path.join(folder, "seg_maps"), s))
        if pred:  # the first head's output (the paper's setting has one teacher)
            result["pred"] = evaluate(network("student", weights, run.student, use_pred=True), study.data,
                                      s.image_size, os.path.join(folder, "features_pred"), s.probe_epochs)  # fmt: skip
    result["total_s"] = round(time.perf_counter() - start, 1)
    result["command"] = "python " + " ".join(["train_student.py", *argv])
    write_json(os.path.join(folder, RESULT), result)
    log.info("finished %s seed %d in %.0f s: 1-NN %.2f", run.key(), seed, result["total_s"], result["backbone"]["knn1"])
    return result


def run_reference(
    study: Study, name: str, kind: str, arch: str, weights: str | None, seed: int, data: str = "digits"
) -> dict:
    """A teacher or a random-init student under the same protocol (written once, skipped after); on the
    segmentation demo (``data`` segdemo, the dense row) with the segmentation probe too."""
    folder = os.path.join(study.out, "references", f"{name}-seed{seed}" if kind == "random" else name)
    done = read_json(os.path.join(folder, RESULT))
    if done is not None:
        return done
    root, size = study.data_of(data), study.size_of(data)
    with study._eval_lock:
        model = network(kind, weights, arch, seed)
        result = {"kind": kind, "arch": arch, "seed": seed, "data": data}
        result.update(evaluate(model, root, size, os.path.join(folder, "features"), study.scale.probe_epochs))
        if data == "segdemo":
            result.update(segmentation(model, root, os.path.join(folder, "seg_maps"), study.scale))
    write_json(os.path.join(folder, RESULT), result)
    return result


def run_all(study: Study, runs: list[RunConfig], pred_runs: set[RunConfig], jobs: int) -> dict:
    """Teachers first, then every (run, seed) on ``jobs`` parallel trainings; {(key, seed): result}."""
    for name in sorted({t for r in runs for t in r.teachers}):
        prepare_teacher(study, study.teachers[name])
    tasks = [(r, s) for s in study.scale.seeds for r in runs]  # seed-major: every row has seed 0 first
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {(r.key(), s): pool.submit(run_student, study, r, s, r in pred_runs) for r, s in tasks}
        return {k: f.result() for k, f in futures.items()}
