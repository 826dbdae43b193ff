"""tools.plot: training curves from logs/train_log.jsonl, one run or several overlaid, as a PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.errors import UserError
from tools import plot
from tools.study.curves import curves_figure, knn_series, loss_series, read_log

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(exp_dir, records):
    (exp_dir / "logs").mkdir(parents=True)
    (exp_dir / "logs" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return exp_dir


def test_read_log_keeps_last_record_per_epoch_in_order(tmp_path):
    exp = write_log(tmp_path / "a", [{"epoch": 2, "loss": 0.5}, {"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.4}])
    assert read_log(str(exp)) == [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.4}]


def test_series_per_teacher_and_knn_by_k():
    recs = [
        {
            "epoch": 1,
            "loss": 1.0,
            "loss_teacher_10": 3.0,
            "loss_teacher_2": 2.0,
            "knn_top1_k20": 40.0,
            "knn_top1_k1": 50.0,
        },
        {"epoch": 2, "loss": 0.5, "loss_teacher_10": 1.0, "loss_teacher_2": 0.5},
    ]
    assert list(loss_series(recs)) == ["loss", "loss_teacher_2", "loss_teacher_10"]
    assert loss_series(recs)["loss_teacher_10"] == [(1, 3.0), (2, 1.0)]
    assert knn_series(recs) == {"1-NN": [(1, 50.0)], "20-NN": [(1, 40.0)]}


def test_each_teacher_has_its_own_line_style_and_epochs_tick_whole():
    recs = [{"epoch": e, "loss": 1 / e, "loss_teacher_1": 2 / e, "loss_teacher_2": 3 / e, "lr": 0.1} for e in (1, 2, 3)]
    fig = curves_figure({"run": recs})
    loss_axes = fig.axes[0]
    styles = {line.get_label(): line.get_linestyle() for line in loss_axes.get_lines()}
    assert styles == {"run": "-", "run: teacher 1": "--", "run: teacher 2": ":"}
    fig.canvas.draw()  # ticks are placed when drawn
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_plot_two_runs_writes_png(tmp_path):
    a = write_log(tmp_path / "a", [{"epoch": e, "loss": 1 / e, "lr": 0.05, "images_per_s": 100.0} for e in (1, 2)])
    b = write_log(tmp_path / "b", [{"epoch": 1, "loss": 0.8, "loss_teacher_0": 0.7, "knn_top1_k1": 60.0}])
    out = tmp_path / "curves.png"
    args = plot.get_args_parser().parse_args([str(a), str(b), "--labels", "x", "y", "--out", str(out)])
    assert plot.main(args) == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow  # a fresh interpreter imports torch
def test_one_run_default_out_is_in_its_logs(tmp_path):
    a = write_log(tmp_path / "a", [{"epoch": 1, "loss": 1.0}])
    out = subprocess.run([sys.executable, "-m", "tools.plot", str(a)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(a / "logs" / "train_curves.png")
    assert (a / "logs" / "train_curves.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("records", "extra", "message"),
    [
        (None, [], "does not exist"),
        ([], [], "holds no epoch"),
        ([{"epoch": 1, "loss": 1.0}], ["--labels", "x", "y"], "--labels has 2 names for 1"),
    ],
)
def test_user_mistakes_name_the_fix(tmp_path, records, extra, message):
    exp = tmp_path / "a"
    if records is not None:
        write_log(exp, records)
    with pytest.raises(UserError, match=message):
        plot.main(plot.get_args_parser().parse_args([str(exp), *extra]))


def test_damaged_log_line_is_named(tmp_path):
    exp = write_log(tmp_path / "a", [{"epoch": 1, "loss": 1.0}])
    with open(exp / "logs" / "train_log.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match="line 2 of .* is not JSON"):
        read_log(str(exp))
