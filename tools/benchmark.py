"""The benchmark: every speed figure of the project from one command, one profile per question.

    python -m tools.benchmark cpu --json bench_cpu.json       # the original recipe against ours, 2 CPU cores
    python -m tools.benchmark gpu --json bench_gpu.json       # the same stages at ImageNet sizes, one H100
    python -m tools.benchmark gpu --dry_run                   # tiny sizes, every code path, any device
    python -m tools.benchmark cache --rounds 7                # what a K-view teacher cache costs and saves
    python -m tools.benchmark knn --set knn_train=1281167     # eval_knn's torch backend against faiss
    python -m tools.benchmark main_job --json main_job.json   # train_student.py and eval_knn.py for real
    python -m tools.benchmark hours --rows bench_gpu.json main_job.json --summary projection.md

A profile (``tools/bench/profiles.py``) is a list of stages and their sizes; ``--stages`` runs a subset,
``--set NAME=VALUE`` changes a size (``--help`` lists them), ``--dry_run`` shrinks them all. Every
"ours" row calls the code the entry scripts call; the baseline is the original recipe re-created
(``tools/bench/baseline.py``) or the reference the profile names. Timing stages run the baseline, our
variants and the baseline once more (the noise floor) interleaved, round after round; a row's ``img_s``
is the median rate over the rounds. ``--json`` writes the rows as a list (after every stage), each with
the machine and the ``command`` that made it; ``--summary`` writes the printed table too.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
from types import SimpleNamespace

import torch

from models.errors import UserError
from models.io import atomic_write, read_json
from tools.bench.harness import Context, failed_stages, format_table, machine_info, prepare_jpegs, run_stages
from tools.bench.profiles import PROFILES, SIZE_TYPES
from tools.engine import cli
from tools.engine.distributed import pick_device
from tools.engine.logs import setup_logging

log = logging.getLogger("simreg.benchmark")
SHORTCUTS = ("rounds", "images", "jpeg_size", "crop", "threads")  # sizes with a flag of their own


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    sizes = "\n".join(f"  {name:<9} {entry['help']}\n            sizes: {', '.join(entry['sizes'])}"
                      for name, entry in PROFILES.items())  # fmt: skip
    p = cli.ArgumentParser("SimReg benchmark", add_help=add_help, epilog=f"profiles:\n{sizes}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("profile", choices=list(PROFILES), help="what to measure (below)")
    p.add_argument("--dry_run", action="store_true", help="toy sizes: every code path of the profile in seconds")
    p.add_argument("--stages", default=None, help="comma-separated subset of the profile's stages (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="change one of the profile's sizes")
    p.add_argument("--json", default=None, help="write the result rows to this JSON file")
    p.add_argument("--summary", default=None, help="also write the printed table to this file")
    p.add_argument("--rows", nargs="+", default=[], help="hours: the JSON rows of earlier runs to project from")
    p.add_argument("--work_dir", default=None, help="generated JPEGs, caches and runs (default: the temp folder)")
    p.add_argument("--device", default="auto", type=cli.device_name, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--rounds", type=cli.positive_int, default=None, help="timed rounds per stage (profile's)")
    p.add_argument("--images", type=cli.positive_int, default=None, help="number of generated JPEGs (profile's)")
    p.add_argument("--jpeg_size", type=cli.width_x_height, default=None, help="generated JPEG size, e.g. 500x375")
    p.add_argument("--crop", type=cli.image_size_int, default=None, help="data stage crop size (profile's: 224)")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads of the main process")
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    cli.add_debug_flag(p)
    return p


# ============ the profile, its sizes and stages, checked before any work ============
def read_size(name: str, text: str, default: object) -> object:
    """``--set NAME=VALUE``'s value, read as the size's type; a UserError naming the size if it does not fit."""
    if name in SIZE_TYPES:
        parse = SIZE_TYPES[name]
    elif isinstance(default, bool):
        parse = yes_no
    elif isinstance(default, int):
        parse = cli.positive_int
    elif isinstance(default, float):
        parse = cli.positive_float
    elif isinstance(default, tuple):
        parse = lambda t: tuple(v.strip() for v in t.split(",") if v.strip())  # noqa: E731
    elif isinstance(default, str):
        parse = str
    else:
        raise UserError(f"--set {name}: this size is a {type(default).__name__}; change it in tools/bench/profiles.py")
    try:
        return parse(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise UserError(f"--set {name}={text}: {exc}") from None


def yes_no(text: str) -> bool:
    """``yes``/``true``/``1`` or ``no``/``false``/``0``."""
    answers = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
    if text.lower() not in answers:
        raise ValueError(f"expected yes or no, got {text!r}")
    return answers[text.lower()]


def profile_sizes(args: argparse.Namespace, profile: dict) -> SimpleNamespace:
    """The profile's sizes with --dry_run, the shortcut flags and every --set applied."""
    sizes = {**profile["sizes"], **(profile.get("dry_run", {}) if args.dry_run else {})}
    for name in SHORTCUTS:
        value = getattr(args, name)
        if value is not None and name not in sizes:
            raise UserError(f"--{name} does not apply to the {args.profile} profile; its sizes are {', '.join(sizes)}")
        if value is not None:
            sizes[name] = value
    for setting in args.set:
        name, eq, text = setting.partition("=")
        if not eq or name not in sizes:
            raise UserError(f"--set {setting}: give NAME=VALUE with NAME one of the {args.profile} profile's sizes "
                            f"({', '.join(sizes)})")  # fmt: skip
        sizes[name] = read_size(name, text, sizes[name])
    return SimpleNamespace(**sizes)


def chosen_stages(args: argparse.Namespace, profile: dict) -> dict:
    stages = profile["stages"]
    if args.stages is None:
        return dict(stages)
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in stages]
    if unknown or not names:
        raise UserError(f"unknown stage(s) {', '.join(unknown) or '(none given)'} in --stages; "
                        f"the {args.profile} profile has {', '.join(stages)}")  # fmt: skip
    return {name: stages[name] for name in names}


def read_rows(paths: list[str]) -> list[dict]:
    """The rows of earlier runs (--rows), each file a JSON list as --json writes it."""
    rows = []
    for path in paths:
        cli.check_paths(files={"--rows": path})
        found = read_json(path)
        if not isinstance(found, list):
            raise UserError(f"--rows '{path}' is not a JSON list of rows; give a file that --json wrote")
        rows += found
    return rows


def resolve(args: argparse.Namespace) -> tuple[dict, SimpleNamespace, Context, dict]:
    """The profile, its sizes, the context and the stages; every user mistake is an error here."""
    profile = PROFILES[args.profile]
    p = profile_sizes(args, profile)
    device = pick_device(args.device)
    if profile.get("reads_rows") and not args.rows:
        raise UserError(f"the {args.profile} profile reads the rows of earlier runs: give --rows FILE.json")
    if args.rows and not profile.get("reads_rows"):
        raise UserError(f"--rows is read by the hours profile, not by {args.profile}")
    stages = chosen_stages(args, profile)
    for flag in ("--json", "--summary"):
        cli.check_output_file(flag, getattr(args, flag[2:]))
    cli.check_output_folder("--work_dir", args.work_dir)
    if profile.get("needs_cuda") and device.type != "cuda" and not args.dry_run:
        raise UserError(f"the {args.profile} profile needs a CUDA device; add --dry_run to rehearse its code on the "
                        f"CPU{', or use the cpu profile' if args.profile == 'gpu' else ''}")  # fmt: skip
    work = args.work_dir or os.path.join(tempfile.gettempdir(), "simreg_bench")
    ctx = Context(device, work, "inductor" if device.type == "cuda" else "aot_eager", json_path=args.json)
    ctx.inputs = read_rows(args.rows)
    if "check" in profile:
        profile["check"](p, ctx)
    return profile, p, ctx, stages


def command_line(args: argparse.Namespace) -> str:
    """The command that makes these rows, from the flags that differ from their defaults."""
    words = ["python", "-m", "tools.benchmark", args.profile]
    for action in get_args_parser()._actions:
        value, flag = getattr(args, action.dest, None), (action.option_strings or [""])[0]
        if not flag or action.dest in ("help", "debug") or value in (None, False, [], action.default):
            continue
        if value is True:
            words.append(flag)
        elif action.dest == "set":
            words += [w for v in value for w in (flag, v)]
        elif action.dest == "rows":
            words += [flag, *value]
        else:
            words += [flag, "x".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return shlex.join(words)


# ============ running it ============
def main(args: argparse.Namespace) -> list[dict]:
    setup_logging(None, True, args.debug)
    profile, p, ctx, stages = resolve(args)
    log.info("profile %s%s: %s", args.profile, " (dry run)" if args.dry_run else "", vars(p))
    threads = torch.get_num_threads()
    if args.threads or getattr(p, "threads", 0):
        torch.set_num_threads(args.threads or p.threads)
    try:
        torch.manual_seed(args.seed)
        torch.backends.cudnn.benchmark = True
        os.makedirs(ctx.work_dir, exist_ok=True)
        meta = {"profile": args.profile + (" (dry run)" if args.dry_run else ""), "command": command_line(args)}
        meta.update(machine_info(ctx.device), torch_threads=torch.get_num_threads())
        if profile.get("jpegs"):
            made = prepare_jpegs(ctx.work_dir, p.images, p.jpeg_size, p.workers)
            ctx.train_dir = os.path.join(made["root"], "train")
            meta.update(jpeg_kb=made["mean_kb"], jpeg_size="x".join(map(str, p.jpeg_size)))
            meta.update({"crop": p.crop} if hasattr(p, "crop") else {})
        rows = run_stages(stages, p, ctx, meta)
    finally:
        torch.set_num_threads(threads)
    report(rows, profile, p, ctx, args.summary)
    failed = failed_stages(rows)
    if failed:
        raise RuntimeError(f"benchmark stage(s) {', '.join(failed)} failed; see the log above")
    return rows


def report(rows: list[dict], profile: dict, p: SimpleNamespace, ctx: Context, summary: str | None) -> None:
    """Print the profile's table (and write it to ``summary``); say where the rows went."""
    if "table" in profile:
        text = profile["table"](rows, p, ctx)
    else:
        text = format_table(rows, rows[0] if rows else machine_info(ctx.device))
    print(text, end="")
    if summary:
        atomic_write(summary, lambda f: f.write(text.encode()))
    if ctx.json_path:
        print(f"rows written to {ctx.json_path}")


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
