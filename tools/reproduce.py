"""The paper's findings at small scale: a grid of student trainings, several seeds each, evaluated with
1-NN, 20-NN and the cached linear probe beside the teachers and the random-init students.

    python -m tools.reproduce                              # the whole grid on the embedded demo data
    python -m tools.reproduce --only head views --jobs 2   # some rows, two trainings at a time
    python -m tools.reproduce --report                     # summary.json, figures, docs/study.md section only
    python -m tools.reproduce --data /data/imagenet100 --teacher_a r50.pth --teacher_b dino_r50.pth \
        --image_size 224 --epochs 30 --out results/imagenet100

Every run writes its result as it finishes and a rerun skips finished runs, so an interrupted grid
continues where it stopped. Rows: see ``tools/study/grid.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

import torch

from data.demo import make_demo_dataset
from models.errors import UserError
from models.io import read_json
from tools.engine import cli
from tools.engine.logs import setup_logging
from tools.study import report
from tools.study.grid import RunConfig, Scale, rows, runs_of, select_rows, students_of, teachers_of
from tools.study.runner import Study, Teacher, run_all
from tools.study.verify import verify_seed

log = logging.getLogger("simreg.reproduce")
DEFAULT = Scale()


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("the paper's findings at small scale", add_help=add_help)
    p.add_argument("--data", default=None, help="dataset root with train/ and val/ (default: the embedded demo)")
    p.add_argument("--out", default="results/small_scale", help="study folder: runs, summary.json, figures")
    p.add_argument("--only", nargs="+", default=None, metavar="ROW", help="run only these rows (head, views, ...)")
    p.add_argument("--jobs", type=cli.positive_int, default=1, help="trainings at a time (one per free core)")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads per training")
    p.add_argument("--seeds", type=cli.positive_int, default=len(DEFAULT.seeds), help="seeds per configuration")
    p.add_argument("--epochs", type=cli.positive_int, default=DEFAULT.epochs, help="student epochs")
    p.add_argument("--teacher_epochs", type=cli.positive_int, default=DEFAULT.teacher_epochs, help="demo teachers")
    p.add_argument("--batch_size", type=cli.positive_int, default=DEFAULT.batch_size)
    p.add_argument("--learning_rate", type=cli.positive_float, default=DEFAULT.lr)
    p.add_argument("--image_size", type=cli.image_size_int, default=DEFAULT.image_size)
    p.add_argument("--probe_epochs", type=cli.positive_int, default=DEFAULT.probe_epochs, help="cached linear probe")
    p.add_argument("--student", default=DEFAULT.student, help="the default student (every row but 'student')")
    p.add_argument("--teacher_a", default=None, help="teacher A file (default: a demo ResNet-18, seed 0)")
    p.add_argument("--teacher_b", default=None, help="teacher B file (default: a demo ResNet-18, seed 1)")
    p.add_argument("--arch_teacher", nargs=2, default=["resnet18", "resnet18"], metavar=("A", "B"),
                   help="the two teachers' architectures")  # fmt: skip
    p.add_argument("--knn_every", type=cli.nonneg_int, default=1, help="k-NN curves of the paper's setting")
    p.add_argument(
        "--verify_seed",
        type=cli.nonneg_int,
        default=None,
        metavar="S",
        help="retrain seed S of the selected rows from scratch and check it reproduces the recorded numbers",
    )
    p.add_argument("--report", action="store_true", help="only gather finished runs into the summary and figures")
    p.add_argument("--doc", default="docs/study.md", help="Markdown file whose generated section is rewritten")
    cli.add_debug_flag(p)
    return p


def build_study(args: argparse.Namespace) -> Study:
    """The study the flags describe; the demo data is written when no --data is given."""
    scale = Scale(student=args.student, epochs=args.epochs, batch_size=args.batch_size, lr=args.learning_rate,
                  image_size=args.image_size, seeds=tuple(range(args.seeds)), teacher_epochs=args.teacher_epochs,
                  probe_epochs=args.probe_epochs)  # fmt: skip
    data = args.data or make_demo_dataset(os.path.join(args.out, "demo_data"))
    cli.check_paths(folders={"--data": data}, files={"--teacher_a": args.teacher_a, "--teacher_b": args.teacher_b})
    teachers = {
        name: Teacher(name, arch, given or os.path.join(args.out, "teachers", f"{name}.pth"), seed)
        for name, arch, given, seed in zip(
            "AB", args.arch_teacher, (args.teacher_a, args.teacher_b), (0, 1), strict=True
        )
    }
    # the dense row's teacher: a demo ResNet-18 trained on the segmentation demo's large digits
    teachers["S"] = Teacher("S", "resnet18", os.path.join(args.out, "teachers", "S.pth"), 2, "segdemo")
    return Study(args.out, data, scale, teachers, args.threads, args.knn_every, RunConfig(student=scale.student))


def report_verification(record: dict, out: str) -> dict:
    """Print what the verification found; a failed check is a user-facing error naming verify.json."""
    seed, path = record["seed"], os.path.join(out, "verify.json")
    where = "the recording machine's kind" if record["exact_expected"] else "another CPU kind or torch build"
    for key, run in record["runs"].items():
        moved = {n: c for n, c in run["numbers"].items() if not c["exact"]}
        shown = ", ".join(f"{n} {c['rerun']:.4g} (recorded {c['recorded']:.4g}, band {c['band'][0]:.4g}-"
                          f"{c['band'][1]:.4g})" for n, c in moved.items())  # fmt: skip
        print(f"seed {seed} of {key}: " + ("identical" if run["exact"] else shown), flush=True)
    for name, c in record["conclusions"].items():
        print(f"row {name}: recorded '{c['recorded'].split(':')[0]}', rerun seed '{c['rerun_seed'].split(':')[0]}'")
    if not record["ok"]:
        bad = next(k for k, r in record["runs"].items() if not r["ok"])
        need = "identical numbers" if record["exact_expected"] else "numbers within the recorded seeds' spread"
        raise UserError(f"seed {seed} of {bad} did not reproduce ({where}: {need} expected); see {path}")
    if all(r["exact"] for r in record["runs"].values()):
        print(f"seed {seed}: {len(record['runs'])} runs reproduced their recorded numbers exactly", flush=True)
    else:
        print(f"seed {seed}: on {where} every number is within the recorded seeds' spread (exact numbers "
              f"reproduce only on the recording machine's kind); details in {path}", flush=True)  # fmt: skip
    return record


def main(args: argparse.Namespace) -> dict:
    setup_logging(os.path.join(args.out, "reproduce.log"), True, args.debug)
    torch.set_num_threads(args.threads)
    study = build_study(args)
    selected = select_rows(rows(study.scale), args.only)
    runs = runs_of(selected)
    pred_runs = {v.run for r in selected for v in r.variants if v.use_pred}
    if args.verify_seed is not None:
        return report_verification(verify_seed(study, runs, pred_runs, args.verify_seed), args.out)
    if not args.report:
        log.info("%d configurations x %d seeds", len(runs), len(study.scale.seeds))
        run_all(study, runs, pred_runs, args.jobs)
        report.references(study, teachers_of(selected), students_of(selected), students_of(selected, "segdemo"))
    command = "python -m tools.reproduce " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    previous = read_json(os.path.join(args.out, "summary.json")) or {}
    ran_now = set() if args.report else {r.name for r in selected}
    summary = report.summarise(study, rows(study.scale), command, previous, ran_now)
    report.write_all(study, summary, args.doc)
    return summary


if __name__ == "__main__":
    try:
        cli.run_cli(main, get_args_parser().parse_args())
    except UserError as exc:  # raised before logging is set up
        raise SystemExit(f"error: {exc}") from None
