"""Nothing lost, nobody in: kill and resume, atomic files, safe loading, clear answers to bad input."""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train_student
from models.io import atomic_npy, atomic_save, current_umask, write_json
from tests.conftest import ROOT, Payload, write_image_folder
from tools.engine.checkpoint import checkpoint_paths
from tools.engine.cli import run_cli

TRAIN = [sys.executable, "train_student.py"]


def train_argv(data, teacher, exp_dir, epochs=2, *extra):
    return [data, "--teacher_weights", teacher, "--arch_student", "resnet18", "--image_size", "32",
            "--batch_size", "4", "--epochs", str(epochs), "--num_workers", "0", "--device", "cpu",
            "--single_aug", "--weak_weak", "--exp_dir", exp_dir, "--print_freq", "1", *extra]  # fmt: skip


def final_state(exp_dir):
    ckpt = torch.load(os.path.join(exp_dir, "checkpoints", "checkpoint_latest.pth"), weights_only=True)
    return ckpt["epoch"], {**{f"s.{k}": v for k, v in ckpt["student"].items()},
                           **{f"h.{k}": v for k, v in ckpt["head"].items()}}  # fmt: skip


def assert_same_weights(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    diff = [k for k in a[1] if not torch.equal(a[1][k], b[1][k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def run_until(argv, n_step_lines, sig, cwd=ROOT):
    """Start training, send ``sig`` once ``n_step_lines`` step logs were printed; returns the exit code."""
    proc = subprocess.Popen(TRAIN + argv, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = 0
    for line in proc.stderr:
        if " step " in line and "loss" in line:
            seen += 1
            if seen == n_step_lines:
                proc.send_signal(sig)
                break
    proc.stderr.read()
    return proc.wait(timeout=120)


@pytest.fixture
def data8(tmp_path):
    root = tmp_path / "data"
    write_image_folder(str(root / "train"), per_class=4, seed=0)  # 8 images: 2 steps of 4 per epoch
    return str(root)


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_equals_uninterrupted(data8, resnet18_teacher_file, tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(TRAIN + train_argv(data8, resnet18_teacher_file, straight, 3), cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    argv = train_argv(data8, resnet18_teacher_file, killed, 3, "--ckpt_every_steps", "1")
    for point in (1, 2, 1):  # mid-epoch, at an epoch's end, then again early in the resumed run
        assert run_until(argv, point, signal.SIGKILL) == -signal.SIGKILL
    subprocess.run(TRAIN + argv, cwd=ROOT, check=True, capture_output=True)
    assert_same_weights(final_state(straight), final_state(killed))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_cleanly(data8, resnet18_teacher_file, tmp_path, sig):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    train_student.main(train_student.get_args_parser().parse_args(train_argv(data8, resnet18_teacher_file, straight)))
    argv = train_argv(data8, resnet18_teacher_file, stopped)
    assert run_until(argv, 1, sig) == 0  # no --ckpt_every_steps: the signal alone makes it save
    ckpt = torch.load(checkpoint_paths(stopped)["latest"], weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["progress"]["step"] >= 1
    subprocess.run(TRAIN + argv, cwd=ROOT, check=True, capture_output=True)
    assert_same_weights(final_state(straight), final_state(stopped))


def start_in_own_group(argv, cmd=None):
    """Training in a new process group (as a terminal's foreground job), its stderr readable line by line."""
    return subprocess.Popen((cmd or TRAIN) + argv, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True)  # fmt: skip


def signal_group_at(proc, marker: str, sig) -> str:
    """Send ``sig`` to ``proc``'s whole process group (loader workers and ranks included) once ``marker``
    appears on its stderr; returns the whole stderr."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            os.killpg(proc.pid, sig)
            break
    seen.append(proc.stderr.read())
    proc.wait(timeout=180)
    return "".join(seen)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_stop_signal_to_the_process_group_saves_and_resumes_exactly(data8, resnet18_teacher_file, tmp_path, sig):
    """Ctrl-C (SIGINT to the foreground group), timeout/SLURM's SIGTERM and the USR signals reach the loader
    workers too: they must not die first, the main process saves, and the rerun ends where an uninterrupted
    run ends."""
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    argv = train_argv(data8, resnet18_teacher_file, stopped, 2, "--num_workers", "2")
    proc = start_in_own_group(argv)
    err = signal_group_at(proc, "epoch 1 step 1/", sig)
    name = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
    assert proc.returncode == (130 if sig == signal.SIGINT else 0), err  # 130: a wrapper script stops there
    assert f"stopped by {name} in epoch 1 after step" in err and "rerun the same command to resume" in err, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert err.count("received") == 1
    ckpt = torch.load(checkpoint_paths(stopped)["latest"], weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["progress"]["step"] >= 1
    # Files others can read: what a run writes follows the umask (the tests run under 022 or looser).
    mode = os.stat(checkpoint_paths(stopped)["latest"]).st_mode & 0o777
    assert mode == 0o666 & ~current_umask(), oct(mode)
    done = subprocess.run(TRAIN + argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    train_student.main(train_student.get_args_parser().parse_args(train_argv(data8, resnet18_teacher_file, straight)))
    assert_same_weights(final_state(straight), final_state(stopped))


LAUNCH_2 = [sys.executable, "-m", "tools.launch", "--standalone", "--nproc_per_node", "2", "train_student.py"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_to_two_ranks_and_their_workers_saves_and_resumes_exactly(data8, resnet18_teacher_file,
                                                                              tmp_path, sig):  # fmt: skip
    """The group of a 2-rank run (launcher, ranks, 2 loader workers each): the ranks agree on the step to stop
    after, rank 0 saves, and the rerun ends bit-identical to an uninterrupted 2-rank run."""
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    argv = train_argv(data8, resnet18_teacher_file, stopped, 3, "--num_workers", "2")
    proc = start_in_own_group(argv, LAUNCH_2)
    err = signal_group_at(proc, "epoch 1 step 1/", sig)
    assert proc.returncode == (130 if sig == signal.SIGINT else 0), err
    assert err.count("stopped by") == 1 and "checkpoint saved" in err, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    ckpt = torch.load(checkpoint_paths(stopped)["latest"], weights_only=True)
    assert ckpt["progress"]["step"] >= 1  # the stop's own mid-epoch checkpoint
    for out in (stopped, straight):
        run = subprocess.run(LAUNCH_2 + train_argv(data8, resnet18_teacher_file, out, 3, "--num_workers", "2"),
                             cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
    assert_same_weights(final_state(straight), final_state(stopped))


WORKERS = """
import sys
sys.path.insert(0, {root!r})
import torch
from data.loaders import build_loader

class Rows:
    def __len__(self):
        return 64

    def __getitem__(self, key):
        return torch.zeros(1), 0, key[0]

batches = iter(build_loader(Rows(), 4, num_workers=2))
next(batches), next(batches)  # one batch from each worker: both have started
print(*[w.pid for w in batches._workers], flush=True)
sys.stdin.readline()  # the test has sent SIGTERM to each worker from its own process
print(all(w.is_alive() for w in batches._workers), len(list(batches)), flush=True)
batches = iter(build_loader(Rows(), 4, num_workers=2))
next(batches)  # left running: at exit, multiprocessing ends the workers with SIGTERM from this process
"""


def test_loader_workers_ignore_a_stop_signal_from_outside_but_not_their_parents():
    proc = subprocess.Popen([sys.executable, "-c", WORKERS.format(root=ROOT)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2, proc.stderr.read()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # as `kill -TERM -<group>`, SLURM or `timeout` would
    time.sleep(0.5)
    out, err = proc.communicate("\n", timeout=120)  # no hang at exit: the parent's SIGTERM still ends them
    assert out.split() == ["True", "14"] and proc.returncode == 0, (out, err[-2000:])
    assert "killed by signal" not in err and "Traceback" not in err, err[-2000:]


SECOND_CTRL_C = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from tools.engine.signals import StopRequest
stop = StopRequest().install()
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGTERM)  # another signal, or torchrun forwarding the same Ctrl-C: no abort
os.kill(os.getpid(), signal.SIGINT)
print(stop.name, stop.exit_status, flush=True)
time.sleep(1.1)
os.kill(os.getpid(), signal.SIGINT)  # a person's second Ctrl-C
print("still running", flush=True)
"""


def test_ctrl_c_asks_to_save_and_a_second_one_a_second_later_aborts():
    out = subprocess.run([sys.executable, "-c", SECOND_CTRL_C.format(root=ROOT)], capture_output=True, text=True)
    assert out.stdout == "Ctrl-C 130\n" and out.returncode == -signal.SIGINT, (out.stdout, out.stderr)
    assert "second Ctrl-C: aborting without saving" in out.stderr and "Traceback" not in out.stderr


INTERRUPTED_LOG_WRITE = """
import logging, os, signal, sys
sys.path.insert(0, {root!r})
from tools.engine.logs import attach_log_file, setup_logging
from tools.engine.signals import StopRequest


class OneWriterAtATime:  # a buffered file's rule: entered again while writing, it raises
    def __init__(self, f):
        self.f, self.busy, self.interrupt = f, False, True

    def write(self, text):
        if self.busy:
            raise RuntimeError("reentrant call")
        self.busy = True
        try:
            if self.interrupt:  # Ctrl-C arrives while the log line is being written
                self.interrupt = False
                os.kill(os.getpid(), signal.SIGINT)
            self.f.write(text)
        finally:
            self.busy = False

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


setup_logging()
attach_log_file({log!r})
handler = next(h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler))
handler.setStream(OneWriterAtATime(handler.stream))
stop = StopRequest().install()
logging.getLogger("simreg.train").info("epoch 1 step 1/2 loss 1.0")
print(stop.requested, stop.exit_status, flush=True)
stop.log_notices()  # what the training loop does at every step boundary
logging.shutdown()
"""


def test_a_signal_during_a_log_write_is_said_without_entering_the_log_again(tmp_path):
    """The stop signal can arrive while the main thread writes a log line; the handler must not log (a
    buffered file entered again raises), yet the console gets its line at once and the log file at the next
    step boundary."""
    log_file = str(tmp_path / "train.log")
    script = INTERRUPTED_LOG_WRITE.format(root=ROOT, log=log_file)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout == "True 130\n" and out.returncode == 0, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Logging error" not in out.stderr, out.stderr
    notice = "tools.engine.signals: received Ctrl-C: saving a checkpoint at the next step, then exiting"
    assert out.stderr.count(notice) == 1, out.stderr
    logged = open(log_file).read()
    assert logged.count(notice) == 1 and "epoch 1 step 1/2 loss 1.0" in logged, logged


@pytest.mark.slow
def test_same_seed_same_result_and_other_seed_differs(data8, resnet18_teacher_file, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        argv = train_argv(data8, resnet18_teacher_file, str(tmp_path / name), 1, "--seed", str(seed))
        train_student.main(train_student.get_args_parser().parse_args(argv))
        runs[name] = final_state(str(tmp_path / name))
    assert_same_weights(runs["a"], runs["b"])
    assert not torch.equal(runs["a"][1]["s.conv1.weight"], runs["c"][1]["s.conv1.weight"])


def test_kill_during_a_checkpoint_write_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    atomic_save({"v": torch.zeros(3)}, path)
    code = (f"import torch, sys; sys.path.insert(0, {ROOT!r}); from models.io import atomic_save\n"
            f"while True: atomic_save({{'v': torch.ones(64, 1024, 1024)}}, {path!r})")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    caught = False
    while not caught and time.time() < deadline:
        caught = any(n.startswith(".tmp_") for n in os.listdir(tmp_path))
        time.sleep(0 if caught else 0.005)
    proc.kill()
    proc.wait()
    assert caught, "the writer was never caught mid-write: the test did not exercise the race"
    v = torch.load(path, weights_only=True)["v"]  # the old or a complete new file, never a torn one
    assert v.shape in ((3,), (64, 1024, 1024))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_files_follow_the_umask(tmp_path, umask):
    """Checkpoints, exports, feature arrays and JSON results get the mode open() would give (0666 less the
    umask), not the private 0600 of the temporary file they are written through."""
    before = os.umask(umask)
    try:
        atomic_save({"v": torch.zeros(1)}, str(tmp_path / "ckpt.pth"))
        atomic_npy(str(tmp_path / "feats.npy"), np.zeros(3, dtype=np.float16))
        write_json(str(tmp_path / "results.json"), {"top1": 1.0})
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["ckpt.pth", "feats.npy", "results.json"], 0o666 & ~umask)


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pth")
    atomic_save({"epoch": 1}, path)

    def no_space(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(train_student.UserError, match="no space left.*previous file is intact"):
        atomic_save({"epoch": 2}, path, keep_previous=str(tmp_path / "prev.pth"))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]


def test_corrupt_latest_falls_back_to_previous(data8, resnet18_teacher_file, tmp_path, caplog):
    exp = str(tmp_path / "e")
    parse = train_student.get_args_parser().parse_args
    train_student.main(parse(train_argv(data8, resnet18_teacher_file, exp, 2)))
    paths = checkpoint_paths(exp)
    assert torch.load(paths["previous"], weights_only=True)["epoch"] == 1
    with open(paths["latest"], "r+b") as f:
        f.truncate(1000)
    train_student.main(parse(train_argv(data8, resnet18_teacher_file, exp, 2)))
    assert paths["latest"] in caplog.text and paths["previous"] in caplog.text and "falling back" in caplog.text
    assert torch.load(paths["latest"], weights_only=True)["epoch"] == 2


@pytest.mark.parametrize(
    "flag",
    [
        "--teacher_weights",
        pytest.param("--weights", marks=pytest.mark.slow),
        pytest.param("--resume", marks=pytest.mark.slow),
    ],
)
def test_code_running_pickles_are_refused_everywhere(data8, resnet18_teacher_file, tmp_path, flag):
    marker = tmp_path / "marker"
    evil = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "p": Payload(marker)}, evil)
    argv = train_argv(data8, resnet18_teacher_file, str(tmp_path / "e"), 1)
    if flag == "--teacher_weights":
        argv[argv.index("--teacher_weights") + 1] = evil
    else:
        argv += [flag, evil]
    out = subprocess.run(TRAIN + argv, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "refused to load" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


def make_bad_inputs(tmp_path, kind, resnet18_teacher_file):
    """Returns (data root, extra argv) for one bad-input case."""
    root = tmp_path / "data"
    if kind != "no_data":
        write_image_folder(str(root / "train"), per_class=4)
    extra = []
    if kind == "empty_folder":
        root = tmp_path / "empty"
        os.makedirs(root)
    elif kind == "empty_class":
        os.makedirs(root / "train" / "c_empty")
    elif kind == "no_images":
        for f in (root / "train").glob("*/*.png"):
            f.unlink()
    elif kind == "truncated":
        bad = root / "train" / "a" / "001.png"
        bad.write_bytes(bad.read_bytes()[:40])
        extra = ["--num_workers", "2"]
    elif kind == "wrong_teacher":
        extra = ["--arch_teacher", "resnet50"]
    elif kind == "unknown_format":
        torch.save({"weird.weight": torch.zeros(2)}, str(tmp_path / "odd.pth"))
    elif kind == "nan":
        extra = ["--learning_rate", "1e30"]
    elif kind == "both":
        extra = ["--weights", resnet18_teacher_file, "--resume", resnet18_teacher_file]
    return str(root), extra


BAD_INPUTS = {
    "no_data": "does not exist",
    "empty_folder": "empty' holds no images",
    "empty_class": "c_empty' holds no images",
    "no_images": "holds no images",
    "truncated": "cannot read image '.*001.png'.*--skip_bad_images",
    "wrong_teacher": "holds a resnet18, but --arch_teacher is resnet50",
    "unknown_format": "could not recognise the layout",
    "nan": "NaN or infinite at step 2 of epoch 1",  # step 1 is finite; its update blows up the weights
    "both": "--weights and --resume were both given",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_gets_one_clear_sentence(tmp_path, resnet18_teacher_file, kind, caplog):
    data, extra = make_bad_inputs(tmp_path, kind, resnet18_teacher_file)
    teacher = str(tmp_path / "odd.pth") if kind == "unknown_format" else resnet18_teacher_file
    args = train_student.get_args_parser().parse_args(train_argv(data, teacher, str(tmp_path / "e"), 1, *extra))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_student.main, args)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    assert re.search(BAD_INPUTS[kind], errors[0]), errors[0]
    if kind == "nan":
        assert not os.path.exists(os.path.join(tmp_path, "e", "checkpoints", "checkpoint_latest.pth"))


def test_skip_bad_images_counts_them(tmp_path, resnet18_teacher_file):
    data, _ = make_bad_inputs(tmp_path, "truncated", resnet18_teacher_file)
    exp = str(tmp_path / "e")
    stats = train_student.main(train_student.get_args_parser().parse_args(
        train_argv(data, resnet18_teacher_file, exp, 1, "--skip_bad_images")))  # fmt: skip
    assert stats["bad_images_skipped"] == 1 and stats["steps"] == 2


def test_grayscale_cmyk_rgba_and_palette_images_just_work(tmp_path, resnet18_teacher_file):
    root = tmp_path / "data" / "train"
    rng = np.random.RandomState(0)
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        rgb = Image.fromarray(rng.randint(0, 256, (40, 30, 3), dtype=np.uint8))
        rgb.convert("L").save(root / cls / "gray.png")
        rgb.convert("CMYK").save(root / cls / "cmyk.jpg")
        rgb.convert("RGBA").save(root / cls / "rgba.png")
        rgb.convert("P").save(root / cls / "palette.gif")
    stats = train_student.main(train_student.get_args_parser().parse_args(
        train_argv(str(tmp_path / "data"), resnet18_teacher_file, str(tmp_path / "e"), 1)))  # fmt: skip
    assert stats["steps"] == 2 and np.isfinite(stats["loss"])


def test_epochs_below_resumed_epoch_and_other_run_are_refused(data8, resnet18_teacher_file, tmp_path):
    exp = str(tmp_path / "e")
    parse = train_student.get_args_parser().parse_args
    train_student.main(parse(train_argv(data8, resnet18_teacher_file, exp, 2)))
    with pytest.raises(train_student.UserError, match="--epochs 1 is below the 2 epochs already done"):
        train_student.main(parse(train_argv(data8, resnet18_teacher_file, exp, 1)))
    other_teacher = str(tmp_path / "t2.pth")
    torch.save({k: v + 1 for k, v in torch.load(resnet18_teacher_file, weights_only=True).items()}, other_teacher)
    with pytest.raises(train_student.UserError, match="different run.*teacher"):
        train_student.main(parse(train_argv(data8, other_teacher, exp, 3)))
    write_image_folder(os.path.join(data8, "train"), classes=("c",), per_class=4)
    with pytest.raises(train_student.UserError, match="different run.*n_images"):
        train_student.main(parse(train_argv(data8, resnet18_teacher_file, exp, 3)))


def test_evaluation_checkpoint_and_cache_payloads_run_nothing(tmp_path):
    from models.io import CheckpointError
    from models.pretrained import load_eval_model

    marker = tmp_path / "marker"
    evil = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "p": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_eval_model(evil)
    # A cache is an .npy read without pickle support: an object array is refused, not unpickled.
    npy = str(tmp_path / "cache.npy")
    np.save(npy, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        np.load(npy, mmap_mode="r")  # how the teacher cache opens it
    with pytest.raises(ValueError, match="allow_pickle"):
        np.load(npy)  # how saved evaluation features are read
    assert not marker.exists()
