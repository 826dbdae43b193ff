"""Speed benchmark: the original recipe against ours, stage by stage, in one run.

    python -m tools.benchmark --profile cpu --json bench_cpu.json     # about 2 minutes on 2 CPU cores
    python -m tools.benchmark --profile gpu --json bench_gpu.json     # about 3 minutes on one H100
    python -m tools.benchmark --profile gpu --dry_run                 # tiny sizes, every code path, any device

Stages (``--stages``, default all): ``data`` (loader workers only: decode, crop, collate, on generated
ImageNet-like JPEGs), ``step`` (one distillation step on synthetic on-device batches), ``e2e`` (loader +
step), ``cached`` (the step with a cached teacher), ``knn`` (eval_knn's search and votes), ``probe``
(eval_linear's cached probe). Every "ours" row calls the code the entry scripts call; the baseline is
the original recipe re-created (``tools/bench/baseline.py``). In every stage the baseline, our variants
and the baseline once more (the noise floor) run interleaved, round after round; a row's ``img_s`` is
the median rate over the rounds. ``--json`` writes the rows as a list (``python -m tools.bench_hours``
turns a GPU run's rows into hours for the paper's runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile

import torch

from models.errors import UserError
from tools.bench.eval_stages import stage_knn, stage_probe
from tools.bench.harness import (
    DRY_RUN,
    PROFILES,
    Context,
    Profile,
    machine_info,
    prepare_jpegs,
    print_table,
    run_stages,
)
from tools.bench.stages import stage_cached, stage_data, stage_e2e, stage_step
from tools.engine import cli
from tools.engine.distributed import pick_device
from tools.engine.logs import setup_logging

log = logging.getLogger("simreg.benchmark")

STAGES = {
    "data": stage_data,
    "step": stage_step,
    "e2e": stage_e2e,
    "cached": stage_cached,
    "knn": stage_knn,
    "probe": stage_probe,
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimReg speed benchmark", add_help=add_help)
    p.add_argument("--profile", default="cpu", choices=list(PROFILES), help="sizes: cpu (2 cores) or gpu (one H100)")
    p.add_argument("--dry_run", action="store_true", help="toy sizes: every code path of the profile in seconds")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--json", default=None, help="write the result rows to this JSON file")
    p.add_argument("--work_dir", default=None, help="where generated JPEGs and caches go (default: the temp folder)")
    p.add_argument("--device", default="auto", type=cli.device_name, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--rounds", type=cli.positive_int, default=None, help="timed rounds per stage (default: profile's)")
    p.add_argument("--images", type=cli.positive_int, default=None, help="number of generated JPEGs (profile's)")
    p.add_argument("--jpeg_size", type=cli.width_x_height, default=None, help="generated JPEG size, e.g. 500x375")
    p.add_argument("--crop", type=cli.image_size_int, default=None, help="data stage crop size (profile's: 224)")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads of the main process")
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    cli.add_debug_flag(p)
    return p


def resolve(args: argparse.Namespace) -> tuple[Profile, torch.device, dict]:
    """The profile with the overrides applied, the device and the stages; user mistakes are errors."""
    prof = PROFILES[args.profile]
    if args.dry_run:
        prof = dataclasses.replace(prof, **DRY_RUN)
    overrides = {"rounds": args.rounds, "crop": args.crop, "images": args.images, "jpeg_size": args.jpeg_size}
    prof = dataclasses.replace(prof, **{k: v for k, v in overrides.items() if v})
    device = pick_device(args.device)
    if prof.needs_cuda and device.type != "cuda" and not args.dry_run:
        raise UserError(
            f"--profile {args.profile} needs a CUDA device; use --profile cpu, or add --dry_run to exercise its code"
        )
    if prof.images < max(prof.data_batch, prof.step_batch):
        raise UserError(f"--images {prof.images} is fewer than one batch of this profile "
                        f"({max(prof.data_batch, prof.step_batch)}); give at least that many")  # fmt: skip
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise UserError(f"unknown stage(s) {', '.join(unknown) or '(none given)'} in --stages; "
                        f"choose from {', '.join(STAGES)}")  # fmt: skip
    cli.check_output_file("--json", args.json)
    cli.check_output_folder("--work_dir", args.work_dir)
    return prof, device, {name: STAGES[name] for name in names}


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging(None, True, args.debug)
    prof, device, stages = resolve(args)
    threads = torch.get_num_threads()
    if args.threads or prof.threads:
        torch.set_num_threads(args.threads or prof.threads)
    try:
        torch.manual_seed(args.seed)
        torch.backends.cudnn.benchmark = True
        work = args.work_dir or os.path.join(tempfile.gettempdir(), "simreg_bench")
        made = prepare_jpegs(work, prof.images, prof.jpeg_size, prof.workers)
        backend = "inductor" if device.type == "cuda" else "aot_eager"
        ctx = Context(device, os.path.join(made["root"], "train"), work, backend)
        meta = {"profile": args.profile + (" (dry run)" if args.dry_run else ""), **machine_info(device),
                "torch_threads": torch.get_num_threads(), "jpeg_kb": made["mean_kb"],
                "jpeg_size": "x".join(map(str, prof.jpeg_size)), "crop": prof.crop}  # fmt: skip
        rows = run_stages(stages, prof, ctx, meta, args.json)
    finally:
        torch.set_num_threads(threads)
    print_table(rows, rows[0] if rows else machine_info(device))
    if args.json:
        print(f"rows written to {args.json}")
    failed = [r["stage"] for r in rows if r.get("failed")]
    if failed:
        raise RuntimeError(f"benchmark stage(s) {', '.join(failed)} failed; see the log above")
    return rows


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
