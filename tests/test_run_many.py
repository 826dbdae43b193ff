"""tools.run_many: several runs of an entry script in one process give what separate calls give."""

from __future__ import annotations

import json

import numpy as np
import pytest

import eval_knn
from models.errors import UserError
from tests.eval_helpers import make_image_folder
from tools import run_many

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--resize_size", "16", "--crop_size", "16", "-j", "0", "-b", "8", "-k", "1,3", "--device", "cpu"]


def test_runs_are_split_at_the_separator_with_their_titles():
    words = ["::", "student", "data", "--exp_dir", "e", "::", "random init (resnet18)", "data", "--random_init"]
    assert run_many.split_runs(words) == [
        ("student", ["data", "--exp_dir", "e"]),
        ("random init (resnet18)", ["data", "--random_init"]),
    ]
    with pytest.raises(UserError, match=r"give each run as ':: TITLE ARGS...' after the script \(got data --x\)"):
        run_many.split_runs(["data", "--x"])
    with pytest.raises(UserError, match="run 2 after '::' has no title"):
        run_many.split_runs(["::", "a", "x", "::"])


def test_an_unknown_script_or_a_missing_title_is_one_usage_line(capsys):
    with pytest.raises(SystemExit) as exc:
        run_many.main(["eval_knnn.py", "::", "a"])
    assert exc.value.code == 2 and "invalid choice: 'eval_knnn.py'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_many.main(["eval_knn.py", "data"])
    assert "give each run as ':: TITLE ARGS...'" in capsys.readouterr().err


def test_three_runs_in_one_process_equal_three_separate_calls(tmp_path, capsys):
    root = make_image_folder(str(tmp_path / "data"), {"train": 4, "val": 2}, classes=2, size=16)
    cases = [("a", "resnet18", "0"), ("b", "mobilenet_v2", "0"), ("c", "resnet18", "1")]
    runs = {name: [root, *COMMON, "--random_init", "--arch", arch, "--seed", seed, "--save", str(tmp_path / name)]
            for name, arch, seed in cases}  # fmt: skip
    alone = {name: eval_knn.main(eval_knn.get_args_parser().parse_args(argv))["k"] for name, argv in runs.items()}
    words = []
    for name, argv in runs.items():
        words += ["::", f"run {name}", *[a.replace(str(tmp_path / name), str(tmp_path / f"many_{name}")) for a in argv]]
    run_many.main(["eval_knn.py", *words])
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert headers == ["== eval_knn.py 1/3: run a ==", "== eval_knn.py 2/3: run b ==", "== eval_knn.py 3/3: run c =="]
    feats = lambda d: np.load(tmp_path / d / "val_feats.npy")  # noqa: E731
    for name in runs:
        together = json.loads((tmp_path / f"many_{name}" / "knn_results.json").read_text())["k"]
        assert together == json.loads(json.dumps(alone[name]))  # JSON turns the int keys into strings
        np.testing.assert_array_equal(feats(f"many_{name}"), feats(name))
    assert not np.array_equal(feats("a"), feats("c"))  # the seeds give other networks: the comparison can fail


def test_a_mistake_in_a_later_run_ends_with_its_one_line(tmp_path, caplog):
    root = make_image_folder(str(tmp_path / "data"), {"train": 4, "val": 2}, classes=2, size=16)
    ok = [root, *COMMON, "--random_init", "--arch", "resnet18", "--save", str(tmp_path / "ok")]
    with pytest.raises(SystemExit) as exc:
        run_many.main(["eval_knn.py", "::", "fine", *ok, "::", "wrong", str(tmp_path / "nope"), *COMMON,
                       "--random_init", "--arch", "resnet18", "--save", str(tmp_path / "bad")])  # fmt: skip
    assert exc.value.code == 2 and (tmp_path / "ok" / "knn_results.json").is_file()
    assert "does not exist" in caplog.text
