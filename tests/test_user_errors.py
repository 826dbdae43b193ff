"""The catalogue of user mistakes, each made through the command a user types.

Every case runs a real command line in a fresh process: the Python scripts and modules, and the shell
wrappers with their environment variables. Every one must end the same way: exit status 2, one line
``error: <sentence>`` of at most about 300 characters (the likeliest fix in it), no escape codes, no
traceback, no launcher report, and nothing left behind by a run that was refused at start-up. Lines
logged before the mistake was found (a ``HH:MM:SS INFO ...`` progress line) may precede it.

Each case starts Python, torch and torchvision (about 3-6 s on 2 cores), so all but a few run in the slow
lane; the fast lane keeps one per kind (a wrapper, a training mistake, an evaluation mistake).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field

import pytest
import safetensors.torch
import timm
import torch
import torchvision

from tests.conftest import ROOT, write_image_folder

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) \S+: ")
MAX_CHARS = 300


@dataclass
class Mistake:
    """One user mistake: the command (``{name}`` fields filled from the fixture's paths, ``{out}`` a folder of
    its own that does not exist yet), what the sentence must say, the paths that must not exist afterwards
    (a run refused at start-up writes nothing)."""

    argv: list[str]
    says: str  # a regular expression the error sentence must match
    env: dict = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    not_says: str | None = None  # e.g. a flag this command does not have
    fast: bool = False


PY = [sys.executable]
TRAIN = [*PY, "train_student.py", "{data}", "--teacher_weights", "{teacher}", "--image_size", "32", "--batch_size",
         "2", "--epochs", "1", "-j", "0", "--device", "cpu", "--exp_dir", "{out}/exp"]  # fmt: skip
KNN = [*PY, "eval_knn.py", "{data}", "--weights", "{teacher}", "--resize_size", "32", "--crop_size", "32", "-b", "2",
       "--num_workers", "0", "--device", "cpu", "-k", "1", "--save", "{out}/knn"]  # fmt: skip

# fmt: off
CASES: dict[str, Mistake] = {
    # ---- the shell wrappers (one process: the script itself, no launcher in between)
    "run.sh: DATA does not exist": Mistake(
        ["bash", "run.sh"], r"data folder '.*/nope' does not exist",
        env={"DATA": "{tmp}/nope", "TEACHER": "{teacher}", "EXP_DIR": "{out}", "NUM_WORKERS": "0"},
        absent=("{out}",), fast=True),
    "run.sh: DATA without TEACHER": Mistake(
        ["bash", "run.sh"], r"DATA is set but TEACHER is not; set TEACHER", env={"DATA": "{data}"}),
    "run.sh: a wrong flag in EXTRA": Mistake(
        ["bash", "run.sh"], r"unrecognized arguments: --nope",
        env={"DATA": "{data}", "TEACHER": "{teacher}", "EXP_DIR": "{out}", "EXTRA": "--nope"},
        absent=("{out}",)),
    "knn_eval.sh: no val/": Mistake(
        ["bash", "knn_eval.sh"], r"data folder '.*/only_train' has no val/ sub-folder",
        env={"DATA": "{tmp}/only_train", "EXP_DIR": "{out}"}, absent=("{out}",)),
    "knn_eval.sh, two processes: no val/": Mistake(
        ["bash", "knn_eval.sh"], r"data folder '.*/only_train' has no val/ sub-folder",
        env={"DATA": "{tmp}/only_train", "EXP_DIR": "{out}", "NPROC": "2"}, absent=("{out}",)),
    "knn_eval.sh: no checkpoint in EXP_DIR": Mistake(
        ["bash", "knn_eval.sh"], r"'.*/empty_exp/checkpoints' has no checkpoint_latest.pth .*; train first or give",
        env={"DATA": "{data}", "EXP_DIR": "{tmp}/empty_exp"}, absent=("{tmp}/empty_exp",)),
    "knn_eval.sh: no demo yet": Mistake(
        ["bash", "knn_eval.sh"], r"no finished demo in .*; run 'bash run.sh' first", env={"DEMO_EXP": "{tmp}/nodemo"}),
    "lin_eval.sh: a checkpoint epoch that was not kept": Mistake(
        ["bash", "lin_eval.sh"], r"ckpt_epoch_7.pth' does not exist",
        env={"DATA": "{data}", "EXP_DIR": "{tmp}/empty_exp", "EPOCH": "7"}, absent=("{tmp}/empty_exp",)),
    # ---- training
    "train: data folder does not exist": Mistake(
        [*TRAIN[:2], "{tmp}/nope", *TRAIN[3:]], r"data folder '.*/nope' does not exist; give the dataset root",
        absent=("{out}",), fast=True),
    "train: a flag out of range": Mistake(
        [*TRAIN, "--epochs", "0"], r"argument --epochs: expected a positive integer, got 0",
        absent=("{out}",)),
    "train: a flag that does not exist": Mistake(
        [*TRAIN, "--nope"], r"unrecognized arguments: --nope", absent=("{out}",)),
    "train: teacher file missing": Mistake(
        [*TRAIN, "--teacher_weights", "{tmp}/t.pth"], r"'.*/t.pth' does not exist", absent=("{out}",)),
    "train: an unreadable image suggests --skip_bad_images": Mistake(
        [*TRAIN[:2], "{bad_data}", *TRAIN[3:]], r"cannot read image '.*000.png'.*or pass --skip_bad_images"),
    "train: a whole pickled model as teacher": Mistake(
        [*TRAIN, "--teacher_weights", "{pickle}"],
        r"refused to load teacher '.*whole_model.pth': it is a pickled torch.nn.modules.linear.Linear object, and "
        r"loading one needs arbitrary code to run; where you trust the file, re-save its weights with "
        r"torch.save\(model.state_dict\(\), path\) and give that$", absent=("{out}",)),
    "train: a truncated teacher checkpoint": Mistake(
        [*TRAIN, "--teacher_weights", "{truncated}"],
        r"teacher '.*truncated.pth' is not a readable PyTorch checkpoint, perhaps cut short or damaged "
        r"\(PytorchStreamReader failed reading zip archive: failed finding central directory\); copy or download it "
        r"again, or check that it is the right file$", absent=("{out}",)),
    "train: a timm .safetensors file without --arch_teacher": Mistake(
        [*TRAIN, "--teacher_weights", "{timm_file}"],
        r"^error: could not recognise the layout of '.*resnet10t.safetensors' \(keys .*\); a timm model's file needs "
        r"its name: --arch_teacher timm/<name>", absent=("{out}",)),
    "train: an empty data folder": Mistake(
        [*TRAIN[:2], "{tmp}/empty", *TRAIN[3:]], r"'.*/empty' holds no images \(.jpg, .* in any of its folders$",
        absent=("{out}",)),
    "train: a shard pattern that matches no file": Mistake(
        [*TRAIN[:2], "{tmp}/shards/train-{{000000..000009}}.tar", *TRAIN[3:]],
        r"no shard matches '.*/shards/train-\{000000..000009\}.tar': '.*/train-000000.tar' does not exist \(nor "
        r"the 9 others\); check the folder and the \{first..last\} range$", absent=("{out}",)),
    "train: a shard without its index": Mistake(
        [*TRAIN[:2], "{lone_tar}", *TRAIN[3:]],
        r"shard '.*/lone.tar' has no index '.*/lone.tar.index.npz'; write it with python -m tools.make_shards "
        r"--index '.*/lone.tar'$", absent=("{out}",)),
    "train: --val_data missing": Mistake(
        [*TRAIN, "--knn_every", "1", "--val_data", "{tmp}/nope"],
        r"--val_data folder '.*/nope' does not exist; give a root holding train/ and val/", absent=("{out}",)),
    "make_shards: folder missing": Mistake(
        [*PY, "-m", "tools.make_shards", "{tmp}/nope", "{out}"], r"data folder '.*/nope' does not exist",
        absent=("{out}",)),
    # ---- evaluation and the other commands
    "eval_knn: no val/": Mistake(
        [*KNN[:2], "{tmp}/only_train", *KNN[3:]], r"has no val/ sub-folder", absent=("{out}",), fast=True),
    "eval_knn: a val/ class that train/ lacks": Mistake(
        [*KNN[:2], "{extra_val}", *KNN[3:]], r"val/ has 1 class folder\(s\) that train/ lacks \(c; 2 images\)",
        absent=("{out}",)),
    "eval_knn: an unreadable image names no flag it lacks": Mistake(
        [*KNN[:2], "{bad_data}", *KNN[3:]], r"cannot read image '.*000.png' .*delete or replace the file",
        not_says="--skip_bad_images"),
    "eval_knn: a timm .safetensors file without --arch": Mistake(
        [*KNN, "--weights", "{timm_file}"], r"a timm model's file needs its name: .*\(evaluation: --arch\)",
        absent=("{out}",)),
    "eval_knn: weights missing": Mistake(
        [*KNN, "--weights", "{tmp}/w.pth"], r"--weights '.*/w.pth' does not exist", absent=("{out}",)),
    "eval_knn: a training flag": Mistake([*KNN, "--skip_bad_images"], r"unrecognized arguments: --skip_bad_images"),
    "train: --dense_weight without --loss both": Mistake(
        [*TRAIN, "--loss", "dense", "--dense_weight", "2"],
        r"--dense_weight weighs the dense term of --loss both; drop it with --loss dense", absent=("{out}",)),
    "train: --dense_blocks of a CNN teacher": Mistake(
        [*TRAIN, "--loss", "both", "--dense_blocks", "2"],
        r"--dense_blocks 2 concatenates a ViT's last blocks; teacher resnet18 is not a ViT", absent=("{out}/exp",)),
    "eval_seg: an image folder, not a segmentation set": Mistake(
        [*PY, "eval_seg.py", "{data}", "--weights", "{teacher}", "--teacher", "--save", "{out}/seg", "--device", "cpu"],
        r"is neither a Pascal VOC 2012 folder .* nor an ADE20K one", absent=("{out}",)),
    "eval_seg: a flag that does not exist": Mistake(
        [*PY, "eval_seg.py", "{data}", "--weights", "{teacher}", "--teacher", "--nope"],
        r"unrecognized arguments: --nope"),
    "eval_linear: resume missing": Mistake(
        [*PY, "eval_linear.py", "{data}", "--weights", "{teacher}", "--save", "{out}/linear", "--resume",
         "{tmp}/p.pth", "--device", "cpu"], r"--resume '.*/p.pth' does not exist", absent=("{out}",)),
    "embed: out is not .npy": Mistake(
        [*PY, "-m", "tools.embed", "{data}", "--weights", "{teacher}", "--out", "{tmp}/f.txt"], r"must end in .npy"),
    "cache: out is a folder": Mistake(
        [*PY, "-m", "tools.cache_teacher_features", "{data}", "--teacher_weights", "{teacher}", "--out", "{tmp}/d.npy"],
        r"is a folder"),
    "export: checkpoint missing": Mistake(
        [*PY, "-m", "tools.export", "{tmp}/c.pth", "--format", "torchvision", "--out", "{out}/o.pth"],
        r"'.*/c.pth' does not exist", absent=("{out}",)),
    "eval_summary: a folder that does not exist": Mistake(
        [*PY, "-m", "tools.eval_summary", "{tmp}/nope"], r"folder '.*/nope' does not exist"),
    "plot: a folder that never trained": Mistake(
        [*PY, "-m", "tools.plot", "{tmp}/empty_exp"], r"train_log.jsonl' does not exist"),
}
# fmt: on


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("mistakes")
    data = tmp / "data"
    write_image_folder(str(data / "train"), per_class=2)
    write_image_folder(str(data / "val"), per_class=1)
    write_image_folder(str(tmp / "only_train" / "train"), per_class=2)
    extra_val = tmp / "extra_val"
    write_image_folder(str(extra_val / "train"), per_class=2)
    write_image_folder(str(extra_val / "val"), classes=("a", "b", "c"), per_class=2)
    bad = tmp / "bad_data"
    write_image_folder(str(bad / "train"), per_class=2)
    write_image_folder(str(bad / "val"), per_class=1)
    for split in ("train", "val"):
        (bad / split / "a" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    teacher = tmp / "teacher_r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), teacher)
    truncated = tmp / "truncated.pth"
    truncated.write_bytes(teacher.read_bytes()[:100_000])
    timm_file = tmp / "resnet10t.safetensors"  # what timm and its hub save: timm's names, no layout to detect
    safetensors.torch.save_file(timm.create_model("resnet10t").state_dict(), str(timm_file))
    pickle = tmp / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), pickle)  # a whole module pickled: needs code to load
    os.makedirs(tmp / "d.npy")
    os.makedirs(tmp / "empty")
    with tarfile.open(tmp / "lone.tar", "w") as tar:  # a WebDataset shard made elsewhere, not indexed yet
        tar.add(str(data / "train" / "a" / "000.png"), arcname="000000.png")
    return {"tmp": str(tmp), "data": str(data), "teacher": str(teacher), "bad_data": str(bad),
            "extra_val": str(extra_val), "truncated": str(truncated), "pickle": str(pickle),
            "timm_file": str(timm_file), "lone_tar": str(tmp / "lone.tar")}  # fmt: skip


def fill(text: str, values: dict) -> str:
    return text.format(**values)


def run_mistake(case: Mistake, values: dict) -> subprocess.CompletedProcess:
    """Run the case's command line with its environment, in the repository root as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: fill(v, values) for k, v in case.env.items()}}
    argv = [fill(a, values) for a in case.argv]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line, after asserting the whole of stderr has the project's shape."""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "\x1b" not in out.stderr, out.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), out.stderr[-3000:]
    others = [ln for ln in lines[:-1] if not LOG_LINE.match(ln)]
    assert not others, f"stray lines besides the log and the error: {others[:5]}"
    return lines[-1]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if c.fast else pytest.mark.slow) for n, c in CASES.items()])
def test_a_user_mistake_is_one_sentence_with_exit_status_2(inputs, name):
    case = CASES[name]
    inputs = {**inputs, "out": os.path.join(inputs["tmp"], re.sub(r"\W+", "_", name))}
    out = run_mistake(case, inputs)
    line = error_line(out)
    # the fixture's folder is as long as the machine's temporary root makes it: count it as one short name
    shown = line.replace(inputs["tmp"], "/tmp/x")
    assert len(shown) <= MAX_CHARS, f"{len(shown)} characters (temporary folder counted as /tmp/x): {line}"
    assert re.search(case.says, line), line
    if case.not_says:
        assert case.not_says not in line, line
    for path in case.absent:
        assert not os.path.exists(fill(path, inputs)), f"{fill(path, inputs)} was left behind"


RANK_ONE_MISTAKE = """
import os, sys
sys.path.insert(0, {root!r})
from models.errors import UserError
from tools.engine.cli import run_cli

def main(args):
    if os.environ["RANK"] == "1":
        raise UserError("only rank 1 found this mistake; fix it there")
    import time
    time.sleep(60)  # rank 0 would wait for its peer in a collective

run_cli(main, None)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_mistake_found_by_another_rank_than_0_is_its_one_sentence(tmp_path):
    """tools.launch reads the failing rank's sentence from its error file, prints it once and exits 2 (torchrun
    would print its report of failed processes instead)."""
    script = tmp_path / "rank_one.py"
    script.write_text(RANK_ONE_MISTAKE.format(root=ROOT))
    argv = [*PY, "-m", "tools.launch", "--standalone", "--nproc_per_node", "2", str(script)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert error_line(out) == "error: only rank 1 found this mistake; fix it there"
    assert len([ln for ln in out.stderr.splitlines() if ln.strip()]) == 1, out.stderr


def test_the_launcher_keeps_the_exit_status_of_a_mistake_and_of_ctrl_c(capsys):
    from tools.launch import exit_status

    class Failure:  # torch's ProcessFailure: the exit code and what the rank's error file held
        def __init__(self, exitcode, message="", timestamp=0):
            self.exitcode, self.message, self.timestamp = exitcode, message or f"Signal {-exitcode}", timestamp
            self.error_file_data = {"message": message, "user_error": True} if message else {}

    def status_and_print(failures, capsys):
        status = exit_status(failures)
        return status, capsys.readouterr().err

    said = "found on a rank"
    # rank 0 printed its sentence and left it in its error file (even if the agent stopped it right after)
    assert status_and_print({0: Failure(2, said), 1: Failure(2, said)}, capsys) == (2, "")
    assert status_and_print({0: Failure(-15, said), 1: Failure(2, said)}, capsys) == (2, "")
    # rank 0 said nothing (stopped by the agent once rank 1 failed): rank 1's sentence, once
    assert status_and_print({0: Failure(-15), 1: Failure(2, said, 5)}, capsys) == (2, f"error: {said}\n")
    assert exit_status({0: Failure(130), 1: Failure(130)}) == 130
    assert exit_status({0: Failure(2), 1: Failure(1)}) is None  # a crash: torchrun's report
    assert exit_status({1: Failure(-9)}) is None and exit_status({0: Failure(-15)}) is None


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys):
    from tools.engine.cli import run_cli

    def main(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_cli(main, None)
    err = capsys.readouterr().err
    assert info.value.code == 130 and err.count("\n") == 1
    assert err.startswith("interrupted by Ctrl-C; rerun the same command")
