"""Print k-NN and linear results of several evaluated networks side by side.

Each argument is ``NAME=DIR`` where DIR holds ``features/knn_results.json`` (eval_knn.py) and/or
``linear/results.json`` (eval_linear.py), e.g. an experiment folder:

    python -m tools.eval_summary "teacher=exp/demo/teacher" "student=exp/demo" "random init=exp/demo/random_init"
"""

from __future__ import annotations

import argparse
import json
import os


def read_results(folder: str) -> dict:
    """{column: value} from a folder's k-NN and linear result files (missing files give no columns)."""
    row = {}
    knn_path = os.path.join(folder, "features", "knn_results.json")
    if os.path.isfile(knn_path):
        with open(knn_path) as f:
            knn = json.load(f)
        for k, res in sorted(knn["k"].items(), key=lambda kv: int(kv[0])):
            row[f"{k}-NN"] = res["majority"]["top1"]
            row[f"{k}-NN weighted"] = res["weighted"]["top1"]
        row["epoch"] = knn.get("epoch")
    linear_path = os.path.join(folder, "linear", "results.json")
    if os.path.isfile(linear_path):
        with open(linear_path) as f:
            linear = json.load(f)
        row["linear top-1"] = linear["headline"]["top1"]
        row["linear top-5"] = linear["headline"]["top5"]
        row["cached"] = "yes" if linear["settings"].get("use_cache") else "no"
    return row


def format_table(rows: dict[str, dict]) -> str:
    """A plain-text table: one line per network, one column per metric (top-1 %, '-' when absent)."""
    columns = []
    for row in rows.values():
        columns += [c for c in row if c not in columns and c not in ("epoch", "cached")]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + "".join(f"{c:>16}" for c in columns)]
    for name, row in rows.items():
        cells = "".join(f"{row[c]:>16.2f}" if isinstance(row.get(c), float) else f"{'-':>16}" for c in columns)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", metavar="NAME=DIR")
    entries = parser.parse_args().entries
    rows = {}
    for entry in entries:
        name, _, folder = entry.partition("=")
        rows[name] = read_results(folder)
    print("top-1 % on the val split (k-NN: majority vote; weighted: DINO's T=0.07; linear: last epoch)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
