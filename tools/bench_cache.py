"""Teacher cache benchmark: the cached step against the live step in one run, and what a cache costs.

    python -m tools.bench_cache                                   # CPU: R50 -> R18, 64 px, batch 16
    python -m tools.bench_cache --device cuda --image_size 224 --batch_size 256 --n_images 4096

On generated ImageNet-like JPEGs (``data/synthetic.py``, 500x375):
1. **build**: a K-view cache (``--views``) of the images with the teacher, through ``build_cache`` (the
   code ``tools.cache_teacher_features`` runs): seconds per view, rows/s, and the file's bytes per row;
   the same for an 8192-d stand-in teacher (a linear map, for the bytes only). From the bytes per row:
   the size of one view of ImageNet-1k (1,281,167 images) at 2048-d and 8192-d.
2. **step**: ``distill_step`` (what ``train_student.py`` runs) with the live teacher, with the cache
   memory-mapped and with it on the device, on the same batches of the training loader (epoch 1, the
   cache's view 1). Rounds interleave them, the live step twice (the ``(repeat)`` row's ratio is the
   noise floor); a rate is the median over the rounds, ``spread`` = (max - min) / median, and
   ``ratio_vs_live`` the median over the rounds of rate / the live step's rate in the same round.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import torch
import torchvision

from data.datasets import IndexedImageFolder, dataset_fingerprint, split_folder
from data.loaders import build_loader
from data.synthetic import make_jpeg_folder
from data.transforms import TeacherView, TrainViews
from models.cached_teacher import CachedTeacher
from models.io import write_json
from models.student import Student
from models.teachers import load_teacher
from tools.engine import cli
from tools.engine.distributed import DistInfo, pick_device
from tools.engine.step import StepConfig, amp_dtype, build_optimizer, distill_step
from tools.engine.teacher_cache import build_cache

log = logging.getLogger("simreg.bench_cache")
IMAGENET_TRAIN = 1_281_167


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("teacher cache benchmark", add_help=add_help)
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "simreg_bench_cache"))
    p.add_argument("--n_images", type=cli.positive_int, default=256, help="generated JPEGs (500x375)")
    p.add_argument("--views", type=cli.positive_int, default=4, help="K of the cache built")
    p.add_argument("--arch_teacher", default="resnet50", help="torchvision architecture of the (random) teacher")
    p.add_argument("--arch_student", default="resnet18")
    p.add_argument("--image_size", type=cli.image_size_int, default=64)
    p.add_argument("--batch_size", type=cli.positive_int, default=16)
    p.add_argument("--steps", type=cli.positive_int, default=4, help="steps per configuration and round")
    p.add_argument("--rounds", type=cli.positive_int, default=5)
    p.add_argument("--num_workers", type=cli.nonneg_int, default=2)
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads in the main process")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"))
    p.add_argument("--device", default="auto", type=cli.device_name)
    p.add_argument("--json", default=None, help="write the results here")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(args, device: torch.device):
    """Images, the teacher (random weights in torchvision's layout, read by load_teacher) and the dataset."""
    make_jpeg_folder(os.path.join(args.work_dir, "data"), args.n_images, processes=max(args.num_workers, 1))
    weights = os.path.join(args.work_dir, f"{args.arch_teacher}.pth")
    if not os.path.exists(weights):
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, args.arch_teacher)().state_dict(), weights)
    teacher = load_teacher(weights, args.arch_teacher).to(device)
    views = TrainViews(args.image_size, True, True, False)  # the paper's single weak view
    train = split_folder(os.path.join(args.work_dir, "data"), "train")
    return teacher, views, IndexedImageFolder(train, TeacherView(views), seed=0)


def bench_build(args, teacher, views, dataset, device: torch.device) -> tuple[str, dict]:
    """Build the K-view cache (timed) and an 8192-d one (bytes only); returns the cache path and figures."""
    out = os.path.join(args.work_dir, f"cache_{args.views}views_{args.image_size}px.npy")
    common = {"batch_size": args.batch_size, "num_workers": args.num_workers, "dist_info": DistInfo(device=device)}
    manifest = {"teacher": {"arch": teacher.arch, "format": teacher.fmt, "use_fc": False, "weights_sha256": ""}}
    manifest.update(preprocessing={}, views=views.record(0))
    sync(device)
    start = time.perf_counter()
    build_cache(teacher, dataset, out, manifest, overwrite=True, n_views=args.views, **common)
    sync(device)
    seconds = time.perf_counter() - start
    rows = args.views * len(dataset)
    wide = torch.nn.Linear(3, 8192).to(device)  # a stand-in 8192-d teacher: the file layout, not the speed
    stand_in = _PooledLinear(wide)
    out8k = os.path.join(args.work_dir, "cache_8192d.npy")
    build_cache(stand_in, dataset, out8k, manifest, overwrite=True, n_views=2, **common)
    per_row = {teacher.feat_dim: os.path.getsize(out) / rows, 8192: os.path.getsize(out8k) / (2 * len(dataset))}
    figures = {
        "build_seconds": round(seconds, 2),
        "seconds_per_view": round(seconds / args.views, 2),
        "rows_per_s": round(rows / seconds, 1),
        "bytes_per_row": {d: round(b, 2) for d, b in per_row.items()},
        "imagenet_gib_per_view": {d: round(b * IMAGENET_TRAIN / 2**30, 2) for d, b in per_row.items()},
    }
    return out, figures


class _PooledLinear(torch.nn.Module):
    """images (B, 3, H, W) -> (B, 8192): a linear map of the mean pixel (cheap, only the width matters)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear, self.feat_dim = linear, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((2, 3)))


def time_steps(student, teacher, batches, optimizer, scaler, cfg: StepConfig) -> tuple[float, float]:
    """Images per second of wall time and of this process's CPU time, over ``len(batches)`` distill steps.

    One host sync at the end, as in training. CPU time leaves out the time other jobs held the cores,
    so on a shared CPU its ratios are the steadier figure (on a GPU only the wall time means anything).
    """
    sync(cfg.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for images, index in batches:
        loss = distill_step(student, teacher, images, index, optimizer, scaler, cfg)
    loss.item()
    sync(cfg.device)
    n = sum(len(i) for i, _ in batches)
    return n / (time.perf_counter() - start), n / max(time.process_time() - cpu_start, 1e-9)


def bench_steps(args, teacher, views, cache_path: str, device: torch.device) -> list[dict]:
    """The live step against the cached one (memory-mapped and on the device), interleaved rounds."""
    dataset = IndexedImageFolder(split_folder(os.path.join(args.work_dir, "data"), "train"), views, seed=0)
    loader = build_loader(dataset, args.batch_size, num_workers=args.num_workers, seed=0)
    loader.sampler.set_epoch(1)
    batches = []
    for images, _, index in loader:  # the loader's own crops of epoch 1 = the cache's view 1
        batches.append((images, index))
        if len(batches) == args.steps:
            break
    fingerprint = dataset_fingerprint(dataset)
    configs = {
        "live teacher": teacher,
        "cached, memory-mapped": CachedTeacher(cache_path, fingerprint, device),
        "cached, on the device": CachedTeacher(cache_path, fingerprint, device, on_device=True),
    }
    student = Student(args.arch_student, teacher.feat_dim, 4).to(device)
    optimizer = build_optimizer(student.parameters(), 0.05, 0.9, 1e-4, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    cfg = StepConfig(DistInfo(device=device), amp_dtype(args.amp, device), False, print_freq=10**9)
    step = lambda t: time_steps(student, t, batches, optimizer, scaler, cfg)  # noqa: E731
    for t in configs.values():  # warm-up: allocator, kernels, the mapped pages
        t.set_epoch(1)
        step(t)
    configs["live teacher (repeat)"] = teacher  # its ratio to the first is the noise floor
    rates = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, t in configs.items():
            rates[name].append(step(t))
    return [_row(name, r, rates["live teacher"]) for name, r in rates.items()]


def _row(name: str, rates: list[tuple[float, float]], live: list[tuple[float, float]]) -> dict:
    """Median rates, spread, and the median over rounds of rate / the live rate of the same round."""
    row = {"config": name}
    for i, key in enumerate(("img_s", "img_per_cpu_s")):
        mine, ref = [r[i] for r in rates], [r[i] for r in live]
        median = statistics.median(mine)
        prefix = "" if i == 0 else "cpu_"
        row[key] = round(median, 2)
        row[prefix + "ratio_vs_live"] = round(statistics.median(a / b for a, b in zip(mine, ref, strict=True)), 2)
        row[prefix + "spread"] = round((max(mine) - min(mine)) / median, 3)
    row["rates"] = [round(r[0], 2) for r in rates]
    return row


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    teacher, views, dataset = prepare(args, device)
    cache_path, build = bench_build(args, teacher, views, dataset, device)
    steps = bench_steps(args, teacher, views, cache_path, device)
    result = {"settings": vars(args), "device": str(device), "torch": torch.__version__, "build": build}
    result["step"] = steps
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
