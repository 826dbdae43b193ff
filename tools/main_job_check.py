"""The main job, for real, on one GPU: training with GPU and CPU decoding, a mid-run stop and exact
resume, k-NN on the result, the cached teacher (``tools/gpu_check.sh`` runs it).

    python -m tools.main_job_check --out /tmp/main_job              # one H100/H200: about 2.5 minutes
    python -m tools.main_job_check --out /tmp/main_job --dry_run    # every part on the CPU at toy sizes

Writes ``OUT/main_job.json`` (one row per part: exit status, seconds, images/s, checks) and
``OUT/main_job.log`` (every command and its output). Exit status 1 when a part failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import torch

from models.errors import UserError
from tools.bench.main_job import PARTS, SIZES, Job, run_job
from tools.engine import cli
from tools.engine.logs import setup_logging

log = logging.getLogger("simreg.main_job")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimReg main-job check", add_help=add_help)
    p.add_argument("--out", required=True, help="folder for main_job.json and main_job.log")
    p.add_argument("--work_dir", default=None, help="generated data and runs (default: the temp folder)")
    p.add_argument("--dry_run", action="store_true", help="every part on the CPU at toy sizes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    cli.add_debug_flag(p)
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    """The parts to run; user mistakes are one sentence."""
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown or not parts:
        raise UserError(f"unknown part(s) {', '.join(unknown) or '(none given)'} in --parts; choose from "
                        f"{', '.join(PARTS)}")  # fmt: skip
    if parts[0] != "data":
        parts.insert(0, "data")  # every part needs the data and the teacher file
    cli.check_output_folder("--out", args.out)
    cli.check_output_folder("--work_dir", args.work_dir)
    if not args.dry_run and not torch.cuda.is_available():
        raise UserError("the main-job check needs a CUDA GPU; add --dry_run to rehearse it on the CPU")
    return parts


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging(None, True, args.debug)
    parts = check_args(args)
    os.makedirs(args.out, exist_ok=True)
    work = args.work_dir or os.path.join(tempfile.gettempdir(), "simreg_bench")
    os.makedirs(work, exist_ok=True)
    job = Job(SIZES["dry" if args.dry_run else "gpu"], os.path.abspath(work), os.path.join(args.out, "main_job.log"))
    rows = run_job(job, parts, os.path.join(args.out, "main_job.json"))
    print(f"\n{'part':<13} {'ok':<5} {'seconds':>8} {'images/s':>9}  notes")
    for r in rows:
        rate = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "-"
        notes = r.get("error") or r.get("skipped") or r.get("resumed") or ""
        print(f"{r['part']:<13} {str(bool(r.get('ok'))):<5} {r['wall_s']:>8.1f} {rate:>9}  {notes[:70]}")
    failed = [r["part"] for r in rows if not r.get("ok")]
    if failed:
        log.error("main job: part(s) %s failed; see %s", ", ".join(failed), job.log_path)
        sys.exit(1)
    return rows


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
