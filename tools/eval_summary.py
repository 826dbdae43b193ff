"""Print k-NN and linear results of several evaluated networks side by side.

Each argument is ``NAME=DIR`` (or a bare ``DIR``, named by its path) where DIR holds
``features/knn_results.json`` (eval_knn.py) and/or ``linear/results.json`` / ``linear_cached/results.json``
(eval_linear.py), e.g. an experiment folder:

    python -m tools.eval_summary "teacher=exp/demo/teacher" "student=exp/demo" "random init=exp/demo/random_init"
    python -m tools.eval_summary exp/demo
"""

from __future__ import annotations

import argparse
import json
import os

from tools.engine import cli


def read_results(folder: str) -> dict:
    """{column: value} from a folder's k-NN and linear result files (missing files give no columns)."""
    row = {}
    knn_path = os.path.join(folder, "features", "knn_results.json")
    if os.path.isfile(knn_path):
        with open(knn_path) as f:
            knn = json.load(f)
        for k, res in sorted(knn["k"].items(), key=lambda kv: int(kv[0])):
            row[f"{k}-NN"] = res["majority"]["top1"]
            if int(k) > 1:  # with one neighbour both votes agree by construction
                row[f"{k}-NN weighted"] = res["weighted"]["top1"]
        row["epoch"] = knn.get("epoch")
    for sub, name in (("linear", "linear"), ("linear_cached", "cached linear")):
        path = os.path.join(folder, sub, "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                linear = json.load(f)
            row[name] = linear["headline"]["top1"]
    return row


def read_losses(folder: str) -> dict:
    """{column: value} of a training run's last logged epoch: the loss and, with several teachers, each one's
    (with ``--loss both``, its global and dense terms too)."""
    path = os.path.join(folder, "logs", "train_log.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    last = json.loads(lines[-1]) if lines else {}
    losses = {"loss": last["loss"]} if "loss" in last else {}
    teachers = sorted((k for k in last if k.startswith("loss_teacher_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    losses.update({f"teacher {k.rsplit('_', 1)[1]}": last[k] for k in teachers})
    losses.update({k[5:]: last[k] for k in ("loss_global", "loss_dense") if k in last})  # --loss both's terms
    return {**losses, "epoch": last.get("epoch")} if losses else {}


def format_table(rows: dict[str, dict], digits: int = 2) -> str:
    """A plain-text table: one line per network, one column per metric (top-1 %, '-' when absent)."""
    columns = []
    for row in rows.values():
        columns += [c for c in row if c not in columns and c != "epoch"]
    width = max(len(n) for n in rows) + 2
    cols = {c: max(10, len(c) + 2) for c in columns}
    lines = [" " * width + "".join(f"{c:>{w}}" for c, w in cols.items())]
    for name, row in rows.items():
        cells = "".join(f"{row[c]:>{w}.{digits}f}" if c in row else f"{'-':>{w}}" for c, w in cols.items())
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def entry(text: str) -> tuple[str, str]:
    """``NAME=DIR`` -> (name, folder), a bare ``DIR`` -> (DIR, DIR); the folder must exist."""
    name, sep, folder = text.partition("=")
    if not sep or os.path.isdir(text):  # a bare folder (whose name may hold '=')
        name, folder = text.rstrip("/") or text, text
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR or DIR (e.g. student=exp/demo), got {text!r}")
    if not os.path.isdir(folder):
        of = "" if name == folder.rstrip("/") else f" of {name!r}"
        raise argparse.ArgumentTypeError(f"folder '{folder}'{of} does not exist; give an evaluated experiment folder")
    return name, folder


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", metavar="NAME=DIR", type=entry)
    entries = parser.parse_args(argv).entries
    rows = {name: read_results(folder) for name, folder in entries}
    print("val top-1 % (k-NN: majority vote, weighted: DINO's T=0.07; linear: last epoch, cached: on cached features)")
    print(format_table(rows))
    losses = {name: row for name, row in ((n, read_losses(folder)) for n, folder in entries) if row}
    if losses:
        print("\ntraining loss of the last epoch (total; per teacher when there are several)")
        print(format_table(losses, digits=4))


if __name__ == "__main__":
    main()
