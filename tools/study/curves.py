"""Training curves from ``<exp_dir>/logs/train_log.jsonl``: loss (per teacher), learning rate, images/s, k-NN.

Drawn with matplotlib's object API on the Agg canvas (no display, no pyplot global state) and written
atomically as one PNG; several runs are overlaid, one colour per run.
"""

from __future__ import annotations

import json
import os

from models.errors import UserError
from models.io import atomic_write

LOG = os.path.join("logs", "train_log.jsonl")
# One run's curves of one panel (its total then each teacher's loss; its k values), in this order.
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def read_log(exp_dir: str) -> list[dict]:
    """The per-epoch records of a training run, in epoch order (a resumed run's repeats: the last wins)."""
    path = os.path.join(exp_dir, LOG)
    if not os.path.isfile(path):
        raise UserError(f"'{path}' does not exist; give an experiment folder of train_student.py that ran an epoch")
    records = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"line {n} of '{path}' is not JSON; the log is damaged") from None
            if "epoch" in rec:
                records[rec["epoch"]] = rec
    if not records:
        raise UserError(f"'{path}' holds no epoch yet; plot after the first epoch has finished")
    return [records[e] for e in sorted(records)]


def loss_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{name: [(epoch, value)]}: ``loss`` and, with several teachers, ``loss_teacher_K`` in teacher order."""
    keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss_teacher_")},
                             key=lambda k: int(k.rsplit("_", 1)[1]))  # fmt: skip
    return {k: [(r["epoch"], r[k]) for r in records if k in r] for k in keys}


def knn_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{``k-NN``: [(epoch, top-1 %)]} of the ``--knn_every`` monitor, the paper's majority vote, by k."""
    keys = sorted({k for r in records for k in r if k.startswith("knn_top1_k")}, key=lambda k: int(k.rsplit("k", 1)[1]))
    return {f"{k.rsplit('k', 1)[1]}-NN": [(r["epoch"], r[k]) for r in records if k in r] for k in keys}


def plot_runs(runs: dict[str, list[dict]], out_png: str, title: str | None = None) -> str:
    """Overlay the curves of ``runs`` ({label: records}) in one PNG (:func:`curves_figure`); returns ``out_png``."""
    fig = curves_figure(runs, title)
    atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    return out_png


def curves_figure(runs: dict[str, list[dict]], title: str | None = None):
    """The matplotlib Figure of ``runs``' curves ({label: records}), one colour per run.

    Panels: loss (solid; teacher 1's loss dashed, teacher 2's dotted, ...), learning rate, images/s and,
    when any run logged it, k-NN top-1 on val (majority vote; 1-NN solid, the next k dashed). Epoch axes
    tick at whole epochs only.
    """
    from matplotlib.figure import Figure  # imported here: only plotting needs matplotlib
    from matplotlib.ticker import MaxNLocator

    has_knn = any(knn_series(recs) for recs in runs.values())
    names = ["loss", "learning rate", "images/s"] + (["k-NN top-1 on val (%)"] if has_knn else [])
    fig = Figure(figsize=(4.2 * len(names), 3.4), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for (label, recs), colour in zip(runs.items(), colours, strict=True):
        _draw_run(axes, label, recs, colour, has_knn)
    for ax, name in zip(axes, names, strict=True):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def _draw_run(axes, label: str, recs: list[dict], colour: str, has_knn: bool) -> None:
    for (name, series), style in zip(loss_series(recs).items(), LINE_STYLES, strict=False):
        tag = label if name == "loss" else f"{label}: teacher {name.rsplit('_', 1)[1]}"
        axes[0].plot(*zip(*series, strict=True), style, color=colour, label=tag)
    for ax, key in ((axes[1], "lr"), (axes[2], "images_per_s")):
        points = [(r["epoch"], r[key]) for r in recs if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), "-", color=colour, label=label)
    if has_knn:
        for (name, series), style in zip(knn_series(recs).items(), LINE_STYLES, strict=False):
            axes[3].plot(*zip(*series, strict=True), style, marker=".", color=colour, label=f"{label}: {name}")
