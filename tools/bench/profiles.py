"""The benchmark's profiles: ``python -m tools.benchmark PROFILE`` runs one of them.

A profile is one entry of :data:`PROFILES`, a plain dict:

- ``help``: one line for ``--help``;
- ``stages``: ``{name: stage}``, run in this order (``--stages`` picks a subset); ``stage(p, ctx)`` returns
  rows (dicts), ``p`` being the sizes (attributes) and ``ctx`` the :class:`tools.bench.harness.Context`;
- ``sizes``: ``{name: value}``, every size the stages read (``--set NAME=VALUE`` changes one);
- optional: ``dry_run`` (sizes that exercise every code path in seconds), ``needs_cuda``, ``jpegs`` (generate
  the ImageNet-like JPEG set first: sizes ``images``, ``jpeg_size``, ``workers``), ``reads_rows`` (the rows
  of earlier runs, ``--rows``), ``check(p, ctx)`` (raise a UserError before any work), ``table(rows, p, ctx)``
  (the printed summary; default: one line per timing row).

Adding a profile is adding an entry here (and its stages, where it needs new ones).
"""

from __future__ import annotations

import logging

from models.errors import UserError
from tools.bench.cache_stages import stage_cache_build, stage_cache_step
from tools.bench.eval_stages import knn_backends, stage_knn, stage_knn_backends, stage_probe
from tools.bench.main_job import STAGES as MAIN_JOB_STAGES
from tools.bench.main_job import format_job_table
from tools.bench.projection import assumptions, format_hours_table, project, split_rows, stage_hours
from tools.bench.train_stages import stage_cached, stage_data, stage_e2e, stage_step, stage_students
from tools.engine import cli
from tools.eval.knn import faiss_module

log = logging.getLogger("simreg.benchmark")

# ============ sizes ============
CPU = {  # 2 CPU cores, about 5 minutes
    "images": 256,  # generated JPEGs (quality 90)
    "jpeg_size": (500, 375),  # ImageNet's typical size
    "crop": 224,  # data stage crop size
    "workers": 2,  # loader processes = cores used by the data stage
    "data_batch": 32,
    "decoders": ("auto", "pil", "draft", "tv"),  # CPU decoders of the data stage
    "teacher": "resnet50",
    "student": "resnet18",
    "step_size": 64,  # step, cached and e2e stages: image size and batch
    "step_batch": 16,
    "step_iters": 1,  # steps per timed round
    "e2e_batches": 2,  # loader batches per timed round
    "cache_rows": 50_000,  # the R50 teacher's cache (rows x 2048 float16), memory-mapped and on the device
    "x4_rows": 16_384,  # a SimCLR-x4 cache (rows x 8192) for the ResNet-50 student row
    "knn_train": 50_000,
    "knn_queries": 1_000,
    "knn_dim": 512,
    "knn_k": 20,
    "probe_rows": 50_000,  # ours: one epoch of these rows per round
    "probe_dim": 512,
    "probe_classes": 100,
    "probe_baseline_steps": 100,  # the original's probe: this many steps (batch 256) per round
    "rounds": 5,
    # torch threads of the main process: on a shared 2-core machine, two threads stall (busy-waiting)
    # whenever another process holds a core, by 10-50x; one thread gives stable per-core figures.
    "threads": 1,  # 0: torch's default
    "compile": False,  # torch.compile variants (minutes of compilation on 2 CPU cores: off)
    "device_decode": False,  # --decode gpu (batched decode_jpeg on the device) and DALI when installed
}
GPU = {  # one H100/H200 with 16 host cores, about 3 minutes
    **CPU,
    "images": 4096,
    "workers": 16,
    "data_batch": 256,
    "decoders": ("auto",),  # the decoder choice is measured on the CPU profile
    "step_size": 224,
    "step_batch": 256,
    "step_iters": 6,
    "e2e_batches": 8,
    "cache_rows": 1_281_167,
    "x4_rows": 131_072,
    "knn_train": 1_281_167,
    "knn_queries": 5_000,
    "probe_rows": 1_281_167,
    "probe_classes": 1000,
    "probe_baseline_steps": 300,
    "rounds": 2,  # the call that runs it has about 3 minutes for this profile
    "threads": 0,
    "compile": True,
    "device_decode": True,
}
TOY = {  # --dry_run of cpu and gpu: the profile's code paths at toy sizes (seconds on a CPU)
    "images": 8,
    "crop": 32,
    "workers": 1,
    "data_batch": 4,
    "teacher": "resnet18",
    "step_size": 32,
    "step_batch": 4,
    "step_iters": 1,
    "e2e_batches": 2,
    "cache_rows": 64,
    "x4_rows": 64,
    "knn_train": 300,
    "knn_queries": 20,
    "knn_dim": 16,
    "knn_k": 5,
    "probe_rows": 300,
    "probe_dim": 16,
    "probe_classes": 10,
    "probe_baseline_steps": 2,
    "rounds": 2,
    "threads": 1,
}
CACHE = {  # R50 -> R18 at 64 px on 2 CPU cores: about 12 minutes with 7 rounds on a shared machine
    "images": 256,
    "jpeg_size": (500, 375),
    "workers": 2,
    "views": 4,  # K of the cache built
    "teacher": "resnet50",  # torchvision architecture of the (random) teacher
    "student": "resnet18",
    "step_size": 64,
    "step_batch": 16,
    "step_iters": 4,  # steps per configuration and round (the loader's first batches of epoch 1)
    "amp": "auto",  # auto (bf16 on CUDA, fp32 elsewhere), bf16 or none
    "rounds": 5,
    "threads": 1,
}
KNN = {  # eval_knn's backends at 200k x 512 (CPU: about a minute per round)
    "knn_train": 200_000,
    "knn_queries": 2_000,
    "knn_dim": 512,
    "knn_classes": 1000,  # one Gaussian cluster per class
    "knn_k": 20,
    "knn_backends": "torch,faiss",  # faiss (when installed) is the baseline
    "knn_chunk": 0,  # torch backend: query rows per block (0: eval_knn's default)
    "rounds": 3,
    "threads": 0,
}
MAIN_JOB = {  # one H100/H200 with a 16-core host: about 2 minutes (estimated), at most 225 s by its limits
    "images": 2048,  # generated JPEGs (the set tools/gpu_check.py's gpu profile run shares)
    "replicas": 2,  # train/ links every file this many times: 4096 images, 16 steps per epoch
    "val_images": 256,
    "jpeg_size": (500, 375),
    "image_size": 224,
    "resize_size": 256,
    "batch": 256,
    "workers": 16,
    "epochs": 3,  # train_gpu and resume: 48 steps
    "short_epochs": 2,  # train_cpu and train_cached: 32 steps (the rate is the second epoch's)
    "print_freq": 4,
    "ckpt_every": 4,  # resume: mid-epoch checkpoints
    "stop_after_lines": 6,  # resume: SIGTERM after this many step log lines (epoch 2, step 8 of 16)
    "teacher": "resnet50",
    "student": "resnet18",
    "ks": "1,20",
    "device": "cuda",
    "exact_resume": False,  # bit-for-bit equality expected (CPU)
    # seconds per part (hang guards, about twice the expected times; each torchrun start costs about 10 s).
    # tools/gpu_check.py gives the whole profile their sum plus a margin (tests/test_gpu_check.py).
    "limits": {
        "data": 20,
        "train_gpu": 40,
        "train_cpu": 30,
        "resume": 60,
        "knn_torch": 25,
        "knn_faiss": 20,
        "cache": 25,
        "train_cached": 25,
    },
}
MAIN_JOB_TOY = {  # every part on the CPU at toy sizes (--decode gpu decodes on the CPU): the rehearsal of DRY=1
    "images": 16,
    "replicas": 1,
    "val_images": 10,  # one per class of the generated set
    "jpeg_size": (64, 48),
    "image_size": 32,
    "resize_size": 36,
    "batch": 4,
    "workers": 1,
    "epochs": 3,
    "short_epochs": 1,
    "print_freq": 1,
    "ckpt_every": 2,
    "stop_after_lines": 6,
    "teacher": "resnet18",
    "ks": "1,4",
    "device": "cpu",
    "exact_resume": True,
    # 2 shared CPU cores: each part takes 20-50 s when the machine is quiet; the limits allow a busy one
    "limits": {
        "data": 60,
        "train_gpu": 90,
        "train_cpu": 90,
        "resume": 180,
        "knn_torch": 90,
        "knn_faiss": 90,
        "cache": 90,
        "train_cached": 90,
    },
}
DEMO = {  # the demo's students at its 32 px (bash run.sh on a CPU)
    "students": (
        "resnet18",
        "mobilenet_v2",
        "timm/resnet10t",
        "regnet_x_400mf",
        "mobilenet_v3_small",
        "shufflenet_v2_x1_0",
    ),
    "teacher_dim": 512,  # the demo teacher's (timm/resnet10t) feature size
    "step_size": 32,
    "step_batch": 64,
    "step_iters": 2,  # steps per timed round
    "rounds": 3,
    "threads": 1,
}
# How a --set value is read, where the default's type is not enough (ints are positive, floats > 0 otherwise).
SIZE_TYPES = {
    "jpeg_size": cli.width_x_height,
    "crop": cli.image_size_int,
    "step_size": cli.image_size_int,
    "image_size": cli.image_size_int,
    "resize_size": cli.image_size_int,
    "workers": cli.nonneg_int,
    "threads": cli.nonneg_int,
    "knn_chunk": cli.nonneg_int,
    "ddp_efficiency": cli.fraction_float,
}


# ============ checks before any work ============
def check_batches(p, ctx) -> None:
    """Enough generated images for one batch of every stage."""
    batch = max(getattr(p, "data_batch", 0), p.step_batch)
    if p.images < batch:
        raise UserError(
            f"--images {p.images} is fewer than one batch of this profile ({batch}); give at least that many"
        )


def check_knn(p, ctx) -> None:
    """Backends that exist here, k within the train rows, features that fit in memory."""
    names = [b.strip() for b in p.knn_backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in ("torch", "faiss")]
    if unknown or not names:
        raise UserError(f"knn_backends {p.knn_backends}: choose from torch, faiss, comma-separated")
    if not knn_backends(p.knn_backends):
        raise UserError("knn_backends faiss needs the faiss package: pip install faiss-cpu, or add torch")
    if "faiss" in names and faiss_module() is None:
        log.warning("faiss is not installed (pip install faiss-cpu); timing the torch backend only")
    if p.knn_k > p.knn_train:
        raise UserError(f"knn_k {p.knn_k} is more than knn_train {p.knn_train}; choose k <= the train rows")
    # train and test features, their clusters' noise, one float32 similarity block: a few copies of each
    need = 4 * (3 * (p.knn_train + p.knn_queries) * p.knn_dim + p.knn_classes * p.knn_dim)
    cli.check_fits(need, f"knn_train {p.knn_train} x knn_dim {p.knn_dim}", "the features", "choose fewer rows")


def check_hours(p, ctx) -> None:
    """Rows to project from."""
    if not project(split_rows(ctx.inputs)[0], assumptions(p)):
        raise UserError("the --rows have no step or data rows to project from; give a gpu or cpu profile's JSON")


# ============ the registry ============
TIMING = {
    "data": stage_data,
    "step": stage_step,
    "e2e": stage_e2e,
    "cached": stage_cached,
    "knn": stage_knn,
    "probe": stage_probe,
}
PROFILES: dict[str, dict] = {
    "cpu": {
        "help": "the original recipe against ours, stage by stage, on a CPU (2 cores: about 5 minutes)",
        "stages": TIMING,
        "sizes": CPU,
        "dry_run": TOY,
        "jpegs": True,
        "check": check_batches,
    },
    "gpu": {
        "help": "the same stages at ImageNet sizes on one GPU (H100/H200: about 3 minutes)",
        "stages": TIMING,
        "sizes": GPU,
        "dry_run": TOY,
        "needs_cuda": True,
        "jpegs": True,
        "check": check_batches,
    },
    "cache": {
        "help": "what a K-view teacher cache costs to build and saves per step (live teacher the baseline)",
        "stages": {"cache_build": stage_cache_build, "cache_step": stage_cache_step},
        "sizes": CACHE,
        "dry_run": {
            "images": 8,
            "jpeg_size": (64, 48),
            "views": 2,
            "teacher": "resnet18",
            "step_size": 32,
            "step_batch": 4,
            "step_iters": 1,
            "rounds": 1,
            "workers": 0,
        },
        "jpegs": True,
        "check": check_batches,
    },
    "knn": {
        "help": "eval_knn's k-NN backends, torch against faiss, on the same clustered features",
        "stages": {"knn_backends": stage_knn_backends},
        "sizes": KNN,
        "dry_run": {"knn_train": 300, "knn_queries": 20, "knn_dim": 16, "knn_classes": 10, "knn_k": 5, "rounds": 1},
        "check": check_knn,
    },
    "demo": {
        "help": "the demo's students at 32 px on a CPU: training images/s of each (forward, backward, SGD step)",
        "stages": {"students": stage_students},
        "sizes": DEMO,
        "dry_run": {"students": ("resnet18", "mobilenet_v3_small"), "step_size": 16, "step_batch": 4, "rounds": 1},
    },
    "main_job": {
        "help": "the main job for real: torchrun train_student.py (GPU and CPU decoding), a mid-run stop and "
        "exact resume, eval_knn.py, the cached teacher (one GPU: about 2 minutes)",
        "stages": MAIN_JOB_STAGES,
        "sizes": MAIN_JOB,
        "dry_run": MAIN_JOB_TOY,
        "needs_cuda": True,
        "table": lambda rows, p, ctx: format_job_table(rows),
    },
    "hours": {
        "help": "hours for the paper's runs (130 epochs of ImageNet-1k, 1 and 8 GPUs) from gpu and main_job rows",
        "stages": {"hours": stage_hours},
        "sizes": {"cores_per_gpu": 16, "ddp_efficiency": 0.9},  # host cores feeding each GPU; per-GPU rate on 8 vs 1
        "reads_rows": True,
        "check": check_hours,
        "table": format_hours_table,
    },
}
