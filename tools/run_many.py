"""Run one of the entry scripts several times in one Python process: torch, torchvision and timm start once.

    python -m tools.run_many eval_knn.py :: "distilled student" ARGS... :: "the teacher" ARGS...

Each ``::`` starts one run; its first word is the run's title, printed as a header, and the rest its
command line, exactly as the script takes it. The runs go one after another, as separate calls of the
script would, and a user mistake in any run ends the whole command with that run's one-line message.
Starting Python with torch and timm takes 5 to 15 s on 2 CPU cores, longer than a k-NN evaluation or a
cached linear probe of the demo, so the demo's ``knn_eval.sh`` and ``lin_eval.sh`` evaluate their three
networks in one process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from models.errors import UserError
from tools.engine import cli

SCRIPTS = ("eval_knn.py", "eval_linear.py", "train_student.py")
SEPARATOR = "::"


def split_runs(words: list[str]) -> list[tuple[str, list[str]]]:
    """``[":: ", title, args..., "::", title, args...]`` -> ``[(title, args), ...]``."""
    if not words or words[0] != SEPARATOR:
        raise UserError(
            f"give each run as ':: TITLE ARGS...' after the script (got {' '.join(words[:3]) or 'nothing'})"
        )
    runs: list[tuple[str, list[str]]] = []
    for word in words:
        if word == SEPARATOR:
            runs.append(("", []))
        elif not runs[-1][0]:
            runs[-1] = (word, [])
        else:
            runs[-1][1].append(word)
    empty = [i + 1 for i, (title, _) in enumerate(runs) if not title]
    if empty:
        raise UserError(f"run {empty[0]} after '::' has no title; write ':: TITLE ARGS...'")
    return runs


def main(argv: list[str] | None = None) -> None:
    p = cli.ArgumentParser("run an entry script several times in one process")
    p.add_argument("script", choices=SCRIPTS)
    p.add_argument("runs", nargs=argparse.REMAINDER, help=":: TITLE ARGS... (one per run)")
    args = p.parse_args(argv)
    try:
        runs = split_runs(args.runs)
    except UserError as exc:
        p.error(str(exc))
    module = importlib.import_module(os.path.splitext(args.script)[0])
    for i, (title, run_argv) in enumerate(runs, 1):
        print(f"== {args.script} {i}/{len(runs)}: {title} ==", flush=True)
        cli.run_cli(module.main, module.get_args_parser().parse_args(run_argv))


if __name__ == "__main__":
    main(sys.argv[1:])
