"""Every flag is validated before any work starts: one sentence naming it, exit status 2, no traceback.

The catalogue, in one place: values argparse refuses while parsing (ranges, types, choices, device
names), then what ``main`` checks first (paths that must be files or folders, devices that are not
there, batches that cannot fit in memory, flags that need each other). The original release's command
lines and flags are accepted (the last tests).
"""

from __future__ import annotations

import importlib
import logging
import os

import pytest
import torch
import torchvision

from tests.conftest import ROOT, write_image_folder
from tests.vit_reference import dinov2_file
from tools.engine.cli import run_cli

SCRIPTS = {
    "train": "train_student",
    "knn": "eval_knn",
    "linear": "eval_linear",
    "cache": "tools.cache_teacher_features",
    "pretrain": "tools.pretrain_teacher",
    "export": "tools.export",
    "embed": "tools.embed",
    "submit": "tools.submit",
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    """Valid inputs shared by every case (no case writes into them: each is refused before any work)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    write_image_folder(str(data / "train"), per_class=2)
    write_image_folder(str(data / "val"), per_class=1)
    a_file = tmp / "a_file.txt"
    a_file.write_text("x")
    teacher = str(tmp / "teacher_r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), teacher)
    os.makedirs(tmp / "d.npy")
    os.makedirs(tmp / "only_train" / "train")
    vit = str(tmp / "dinov2_vits14_pretrain.pth")
    torch.save(dinov2_file(), vit)
    return {"data": str(data), "teacher": teacher, "tmp": str(tmp), "file": str(a_file), "vit": vit}


def base_argv(script: str, p: dict) -> list[str]:
    """A command line of ``script`` that is valid in every respect."""
    tmp = p["tmp"]
    return {
        "train": [p["data"], "--teacher_weights", p["teacher"], "--exp_dir", f"{tmp}/exp", "--image_size", "32",
                  "--batch_size", "2", "--epochs", "1", "--num_workers", "0", "--device", "cpu"],
        "knn": [p["data"], "--weights", p["teacher"], "--save", f"{tmp}/knn", "--device", "cpu", "--crop_size", "32",
                "--resize_size", "32", "-b", "2", "-j", "0"],
        "linear": [p["data"], "--weights", p["teacher"], "--save", f"{tmp}/lin", "--device", "cpu", "--crop_size",
                   "32", "--resize_size", "32", "-b", "2", "-j", "0", "--epochs", "1"],
        "cache": [p["data"], "--teacher_weights", p["teacher"], "--out", f"{tmp}/c.npy", "--device", "cpu",
                  "--crop_size", "32", "--resize_size", "32", "--num_workers", "0"],
        "pretrain": [p["data"], "--out", f"{tmp}/t.pth", "--epochs", "1", "--num_workers", "0"],
        "export": [p["teacher"], "--format", "torchvision", "--out", f"{tmp}/e.pth", "--image_size", "32"],
        "embed": [p["data"], "--weights", p["teacher"], "--out", f"{tmp}/emb.npy", "--device", "cpu", "--crop_size",
                  "32", "--resize_size", "32", "-j", "0"],
        "submit": ["--cluster", "local"],  # the command follows the options: each case adds its own
    }[script]  # fmt: skip


def parser_of(script: str):
    return importlib.import_module(SCRIPTS[script]).get_args_parser()


# ============ refused while parsing: (script, extra argv, the flag named, the message) ============
PARSE = [
    ("train", ["--batch_size", "0"], "--batch_size", "expected a positive integer, got 0"),
    ("train", ["--batch_size", "x"], "--batch_size", "expected a positive integer, got 'x'"),
    ("train", ["--epochs", "0"], "--epochs", "expected a positive integer, got 0"),
    ("train", ["--save_freq", "0"], "--save_freq", "expected a positive integer, got 0"),
    ("train", ["--print_freq", "0"], "--print_freq", "expected a positive integer, got 0"),
    ("train", ["--num_workers", "-1"], "--num_workers/--workers/-j", "expected an integer >= 0, got -1"),
    ("train", ["--workers", "-1"], "--num_workers/--workers/-j", "expected an integer >= 0, got -1"),
    ("train", ["--image_size", "4"], "--image_size", "between 8 and 4096, got 4"),
    ("train", ["--image_size", "5000"], "--image_size", "between 8 and 4096, got 5000"),
    ("train", ["--learning_rate", "-0.1"], "--learning_rate", "expected a number >= 0, got -0.1"),
    ("train", ["--learning_rate", "nan"], "--learning_rate", "expected a number >= 0, got nan"),
    ("train", ["--weight_decay", "-1"], "--weight_decay", "expected a number >= 0"),
    ("train", ["--sgd_momentum", "1"], "--sgd_momentum", "expected a number in [0, 1)"),
    ("train", ["--ckpt_every_steps", "-1"], "--ckpt_every_steps", "expected an integer >= 0"),
    ("train", ["--knn_every", "-2"], "--knn_every", "expected an integer >= 0"),
    ("train", ["--seed", "-1"], "--seed", "expected an integer >= 0"),
    ("train", ["--device", "gpu"], "--device", "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("train", ["--n_mlp_layers", "3"], "--n_mlp_layers", "invalid choice"),
    ("train", ["--amp", "fp8"], "--amp", "invalid choice"),
    ("train", ["--dataset", "cifar"], "--dataset", "invalid choice"),
    ("train", ["--loss", "pixel"], "--loss", "invalid choice"),
    ("train", ["--dense_weight", "-1"], "--dense_weight", "expected a number >= 0, got -1"),
    ("train", ["--dense_blocks", "0"], "--dense_blocks", "expected a positive integer, got 0"),
    ("cache", ["--cache_grid", "0"], "--cache_grid", "expected a positive integer, got 0"),
    ("knn", ["--teacher_pool", "gem"], "--teacher_pool", "invalid choice"),
    ("cache", ["--teacher_pool", "mean"], "--teacher_pool", "invalid choice"),
    ("knn", ["-b", "0"], "-b/--batch-size", "expected a positive integer, got 0"),
    ("knn", ["-j", "-1"], "-j/--workers/--num_workers", "expected an integer >= 0"),
    ("knn", ["--num_workers", "-1"], "-j/--workers/--num_workers", "expected an integer >= 0"),
    ("knn", ["--resize_size", "0"], "--resize_size", "between 8 and 4096, got 0"),
    ("knn", ["--epoch", "-1"], "--epoch", "expected an integer >= 0"),
    ("knn", ["--chunk", "0"], "--chunk", "expected a positive integer"),
    ("knn", ["--temperature", "0"], "--temperature", "expected a number > 0"),
    ("knn", ["--backend", "annoy"], "--backend", "invalid choice"),
    ("knn", ["--device", "tpu"], "--device", "expected auto, cpu, cuda or cuda:N"),
    ("linear", ["--epochs", "0"], "--epochs", "expected a positive integer, got 0"),
    ("linear", ["--lr", "0"], "--lr/--learning-rate", "expected a number > 0, got 0"),
    ("linear", ["--momentum", "1.5"], "--momentum", "expected a number in [0, 1)"),
    ("linear", ["--wd", "-1"], "--wd/--weight-decay", "expected a number >= 0"),
    ("linear", ["--eval-freq", "0"], "--eval-freq", "expected a positive integer"),
    ("linear", ["--min_crop_scale", "0"], "--min_crop_scale", "expected an area fraction in (0, 1]"),
    ("linear", ["--min_crop_scale", "1.5"], "--min_crop_scale", "expected an area fraction in (0, 1]"),
    ("linear", ["-p", "0"], "-p/--print-freq", "expected a positive integer"),
    ("cache", ["--batch_size", "0"], "--batch_size", "expected a positive integer"),
    ("cache", ["--num_workers", "-1"], "--num_workers/--workers/-j", "expected an integer >= 0"),
    ("cache", ["--crop_size", "0"], "--crop_size", "between 8 and 4096"),
    ("cache", ["--views", "-1"], "--views", "expected an integer >= 0"),
    ("cache", ["--views", "2", "--decode", "gpu0"], "--decode", "invalid choice"),
    ("pretrain", ["--epochs", "0"], "--epochs", "expected a positive integer"),
    ("pretrain", ["--learning_rate", "0"], "--learning_rate", "expected a number > 0"),
    ("pretrain", ["--image_size", "2"], "--image_size", "between 8 and 4096"),
    ("export", ["--format", "pdf"], "--format", "invalid choice"),
    ("export", ["--image_size", "4"], "--image_size", "between 8 and 4096, got 4"),
    ("export", ["--opset", "0"], "--opset", "expected a positive integer, got 0"),
    ("export", ["--head", "0"], "--head", "expected a positive integer, got 0"),
    ("embed", ["-b", "0"], "-b/--batch_size", "expected a positive integer, got 0"),
    ("embed", ["-j", "-1"], "-j/--workers/--num_workers", "expected an integer >= 0"),
    ("embed", ["--crop_size", "3"], "--crop_size", "between 8 and 4096, got 3"),
    ("embed", ["--amp", "fp8"], "--amp", "invalid choice"),
    ("submit", ["--nodes", "0"], "--nodes", "expected a positive integer, got 0"),
    ("submit", ["--timeout", "0"], "--timeout", "expected a number > 0, got 0"),
    ("submit", ["--gpus_per_node", "-1"], "--gpus_per_node", "expected an integer >= 0, got -1"),
    ("submit", ["--signal_delay_s", "0"], "--signal_delay_s", "expected a positive integer, got 0"),
    ("submit", ["--cluster", "pbs"], "--cluster", "invalid choice"),
]


@pytest.mark.parametrize(("script", "extra", "flag", "message"), PARSE, ids=[f"{s}{e[0]}={e[1]}" for s, e, *_ in PARSE])
def test_out_of_range_flags_are_refused_while_parsing(paths, capsys, script, extra, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        parser_of(script).parse_args(base_argv(script, paths) + extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"error: argument {flag}: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("script", ["train", "knn", "linear", "cache", "pretrain", "embed"])
def test_both_worker_flag_names_are_accepted(paths, script):
    """--num_workers (training, the cache builder) and --workers/-j (evaluation, PyTorch's ImageNet example)."""
    parser = parser_of(script)
    dest = "num_workers" if script in ("train", "cache", "pretrain") else "workers"
    for name, value in (("--num_workers", "3"), ("--workers", "4"), ("-j", "5")):
        assert getattr(parser.parse_args(base_argv(script, paths) + [name, value]), dest) == int(value)


# ============ refused first thing in main: (script, how to break the valid command, the sentence) ============
def _set(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


MAIN = {
    "train: exp_dir is a file": ("train", lambda a, p: _set(a, "--exp_dir", p["file"]), "is an existing file"),
    "train: no data folder": ("train", lambda a, p: [p["tmp"] + "/nope", *a[1:]], "does not exist"),
    "train: no images": ("train", lambda a, p: [p["tmp"] + "/only_train", *a[1:]], "train' holds no images"),
    "train: teacher missing": ("train", lambda a, p: _set(a, "--teacher_weights", "x.pth"), "'x.pth' does not exist"),
    "train: teacher is a folder": ("train", lambda a, p: _set(a, "--teacher_weights", p["data"]), "is a folder"),
    "train: class list missing": ("train", lambda a, p: a + ["--class_list", "c.txt"], "--class_list 'c.txt' does"),
    "train: resume missing": ("train", lambda a, p: a + ["--resume", "r.pth"], "--resume 'r.pth' does not exist"),
    "train: weights missing": ("train", lambda a, p: a + ["--weights", "w.pth"], "--weights 'w.pth' does not exist"),
    "train: cache missing": (
        "train",
        lambda a, p: a + ["--use_cache", "--teacher_feats", "f.npy"],
        "--teacher_feats 'f.npy' does not exist",
    ),
    "train: unknown pool": ("train", lambda a, p: a + ["--teacher_pool", "max"], "--teacher_pool 'max' is not one of"),
    "train: use_cache alone": ("train", lambda a, p: a + ["--use_cache"], "--use_cache and --teacher_feats"),
    "train: no teacher": (
        "train",
        lambda a, p: [x for x in a if x not in ("--teacher_weights", p["teacher"])],
        "no teacher given",
    ),  # fmt: skip
    "train: restart alone": ("train", lambda a, p: a + ["--restart"], "--restart restarts from the weights of"),
    "train: batch cannot fit": (
        "train",
        lambda a, p: _set(_set(a, "--batch_size", "1000"), "--image_size", "4096"),
        "needs 188 GiB for one float batch",
    ),
    "train: batch above the data": ("train", lambda a, p: _set(a, "--batch_size", "8"), "fewer than --batch_size 8"),
    "train: ViT teacher, crop not a multiple of its patch": (
        "train",
        lambda a, p: _set(_set(a, "--teacher_weights", p["vit"]), "--image_size", "30"),
        "of 30x30 px is not a multiple of the ViT teacher's patch size 14",
    ),
    "train: pooling of a CNN teacher": (
        "train",
        lambda a, p: a + ["--teacher_pool", "avg"],
        "--teacher_pool avg applies to ViT teachers",
    ),
    "train: unknown timm student": (
        "train",
        lambda a, p: _set(a, "--arch_student", "timm/nope"),
        "is not a timm model",
    ),
    "train: ViT file with a CNN arch": (
        "train",
        lambda a, p: _set(_set(a, "--teacher_weights", p["vit"]), "--arch_teacher", "resnet50"),
        "holds a DINOv2 vit_s14_depth2 .* leave --arch_teacher unset",
    ),
    "train: dense weight without both": (
        "train",
        lambda a, p: a + ["--loss", "dense", "--dense_weight", "2"],
        "--dense_weight weighs the dense term of --loss both; drop it with --loss dense",
    ),
    "train: dense blocks with the global loss": (
        "train",
        lambda a, p: a + ["--dense_blocks", "2"],
        "--dense_blocks chooses the dense targets; add --loss dense or --loss both",
    ),
    "train: teacher_fc with the dense loss": (
        "train",
        lambda a, p: a + ["--loss", "dense", "--teacher_fc"],
        "--teacher_fc chooses the pooled target; --loss dense regresses the feature map only",
    ),
    "train: dense blocks of a CNN teacher": (
        "train",
        lambda a, p: a + ["--loss", "dense", "--dense_blocks", "2"],
        "--dense_blocks 2 concatenates a ViT's last blocks; teacher resnet18 is not a ViT",
    ),
    "cache: grid without --dense": (
        "cache",
        lambda a, p: a + ["--cache_grid", "2"],
        "--cache_grid and --dense_blocks describe the dense targets; add --dense",
    ),
    "cache: grid finer than the teacher's": (
        "cache",
        lambda a, p: a + ["--dense", "--cache_grid", "5"],
        "--cache_grid 5 is finer than the teacher's 1x1 grid at 32 px; choose at most 1",
    ),
    "knn: k = 0": ("knn", lambda a, p: a + ["-k", "0"], "give positive integers"),
    "knn: crop above resize": ("knn", lambda a, p: _set(a, "--crop_size", "64"), "is larger than --resize_size"),
    "knn: weights missing": ("knn", lambda a, p: _set(a, "--weights", "w.pth"), "--weights 'w.pth' does not exist"),
    "knn: save is a file": ("knn", lambda a, p: _set(a, "--save", p["file"]), "is a file; give an output folder"),
    "knn: exp_dir is a file": ("knn", lambda a, p: a + ["--exp_dir", p["file"]], "is a file; give the experiment"),
    "knn: no val/": ("knn", lambda a, p: [p["tmp"] + "/only_train", *a[1:]], "has no val/ sub-folder"),
    "knn: class list missing": ("knn", lambda a, p: a + ["--class_list", "c.txt"], "--class_list 'c.txt' does"),
    "knn: batch cannot fit": (
        "knn",
        lambda a, p: _set(_set(_set(a, "-b", "1000"), "--crop_size", "4096"), "--resize_size", "4096"),
        "--batch-size 1000 at 4096 px needs 188 GiB",
    ),
    "knn: k above the data": ("knn", lambda a, p: a + ["-k", "1,20"], "-k 20 exceeds the 4 training images"),
    "linear: resume missing": ("linear", lambda a, p: a + ["--resume", "p.pth"], "--resume 'p.pth' does not exist"),
    "cache: out not .npy": ("cache", lambda a, p: _set(a, "--out", "c.txt"), "must end in .npy"),
    "cache: out is a folder": ("cache", lambda a, p: _set(a, "--out", p["tmp"] + "/d.npy"), "is a folder"),
    "cache: teacher missing": ("cache", lambda a, p: _set(a, "--teacher_weights", "t.pth"), "'t.pth' does not exist"),
    "cache: crop above resize": ("cache", lambda a, p: _set(a, "--crop_size", "64"), "is larger than --resize_size"),
    "cache: no images": ("cache", lambda a, p: [p["tmp"] + "/only_train", *a[1:]], "train' holds no images"),
    "cache: ViT teacher, crop not a multiple of its patch": (
        "cache",
        lambda a, p: _set(a, "--teacher_weights", p["vit"]),
        "of 32x32 px is not a multiple of the ViT teacher's patch size 14",
    ),
    "pretrain: out is a folder": ("pretrain", lambda a, p: _set(a, "--out", p["data"]), "is a folder"),
    "pretrain: unknown arch": ("pretrain", lambda a, p: a + ["--arch", "resnet7"], "unknown architecture 'resnet7'"),
    "pretrain: no train/": ("pretrain", lambda a, p: [p["tmp"], *a[1:]], "has no train/ sub-folder"),
    "export: checkpoint missing": ("export", lambda a, p: ["c.pth", *a[1:]], "CKPT 'c.pth' does not exist"),
    "export: out is a folder": ("export", lambda a, p: _set(a, "--out", p["tmp"]), "is a folder; give the file"),
    "export: safetensors name": (
        "export",
        lambda a, p: _set(_set(a, "--format", "safetensors"), "--out", "s.pth"),
        "must end in .safetensors",
    ),
    "export: opset without onnx": ("export", lambda a, p: a + ["--opset", "17"], "--opset is an ONNX setting"),
    "export: head alone": ("export", lambda a, p: a + ["--head", "2"], "--head 2 selects a prediction head"),
    "embed: out not .npy": ("embed", lambda a, p: _set(a, "--out", "f.txt"), "must end in .npy"),
    "embed: out is a folder": ("embed", lambda a, p: _set(a, "--out", p["tmp"] + "/d.npy"), "is a folder"),
    "embed: no image folder": ("embed", lambda a, p: [p["tmp"] + "/nope", *a[1:]], "image folder '.*' does not"),
    "embed: no images": ("embed", lambda a, p: [p["tmp"] + "/only_train", *a[1:]], "holds no images"),
    "embed: weights missing": ("embed", lambda a, p: _set(a, "--weights", "w.pth"), "--weights 'w.pth' does not"),
    "embed: head alone": ("embed", lambda a, p: a + ["--head", "2"], "--head 2 selects a prediction head"),
    "embed: crop above resize": ("embed", lambda a, p: _set(a, "--crop_size", "64"), "is larger than --resize_size"),
    "submit: no command": ("submit", lambda a, p: a, "no command to run: give it after --"),
    "submit: missing script": ("submit", lambda a, p: a + ["--", "nope.py"], "script 'nope.py' does not exist"),
    "submit: resume in a requeueable job": (
        "submit",
        lambda a, p: a + ["--", os.path.join(ROOT, "train_student.py"), p["data"], "--resume", "x.pth"],
        "--resume in a requeueable job would undo the resume after every preemption",
    ),
    "submit: several nodes locally": (
        "submit",
        lambda a, p: a + ["--nodes", "2", "--", os.path.join(ROOT, "train_student.py")],
        "--nodes 2 needs --cluster slurm",
    ),
}
if not torch.cuda.is_available():
    MAIN["train: no CUDA"] = ("train", lambda a, p: _set(a, "--device", "cuda"), "no CUDA GPU is visible")
    MAIN["knn: no CUDA"] = ("knn", lambda a, p: _set(a, "--device", "cuda:1"), "no CUDA GPU is visible")


@pytest.mark.parametrize("case", sorted(MAIN))
def test_bad_paths_devices_and_sizes_get_one_sentence_before_any_work(paths, caplog, case):
    import re

    script, breaks, message = MAIN[case]
    module = importlib.import_module(SCRIPTS[script])
    args = module.get_args_parser().parse_args(breaks(base_argv(script, paths), paths))
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, args)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    assert re.search(message, errors[0]) or message in errors[0], errors[0]
    if script == "train":  # refused before any work: no checkpoint, no exported backbone
        assert not os.path.exists(os.path.join(paths["tmp"], "exp", "checkpoints"))


def test_summary_entries_are_checked(tmp_path, capsys):
    from tools import eval_summary

    for bad, message in (("student=", "expected NAME=DIR or DIR"), (f"s={tmp_path}/none", "of 's' does not exist"),
                         (f"{tmp_path}/none", f"folder '{tmp_path}/none' does not exist")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            eval_summary.main([bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ============ the original release's command lines ============
def test_the_original_scripts_command_lines_parse(paths):
    """main.py's run.sh, knn_eval.sh and lin_eval.sh flags, verbatim (train_student.py stands for main.py)."""
    train = parser_of("train").parse_args(
        "--base_dir ./ --exp exp_name --arch_teacher resnet50 --arch_student resnet18 --n_mlp_layers 4 "
        "--learning_rate 0.05 --epochs 130 --single_aug --weak_weak --save_freq 10 --teacher_weights "
        "path/to/teacher/weights path/to/imagenet/dataset/root".split()
    )
    assert (train.epochs, train.learning_rate, train.save_freq, train.exp) == (130, 0.05, 10, "exp_name")
    knn = parser_of("knn").parse_args(
        "--arch resnet18 --batch-size 512 --epoch 130 -k 1 --weights exp_name/checkpoints/ckpt_epoch_130.pth "
        "--save exp_name/features path/to/imagenet/dataset/root".split()
    )
    assert (knn.batch_size, knn.epoch, knn.k) == (512, 130, "1")
    linear = parser_of("linear").parse_args(
        "--arch resnet18 --eval-freq 40 --weights exp_name/checkpoints/ckpt_epoch_130.pth --save exp_name/linear "
        "path/to/imagenet/dataset/root".split()
    )
    assert (linear.eval_freq, linear.epochs) == (40, 40)
    more = parser_of("train").parse_args(["d", "--mse_nonorm", "--restart", "--resume", "x", "--print_freq", "5"])
    assert more.mse_nonorm and more.restart and more.print_freq == 5
    more = parser_of("knn").parse_args(["d", "-p", "10", "--dataset", "imagenet-lt", "--load_cache"])
    assert (more.print_freq, more.dataset, more.use_cache) == (10, "imagenet-lt", True)
    more = parser_of("linear").parse_args(["d", "--start-epoch", "3", "-e", "--print-freq", "10"])
    assert (more.start_epoch, more.evaluate, more.print_freq) == (3, True, 10)


@pytest.mark.slow
def test_original_flags_without_effect_say_so(paths, caplog):
    """--mse_nonorm changes nothing (both vectors are normalised) and one log line says so; --restart with
    --resume starts a new run from that file's weights (the original: weights loaded, optimizer not)."""
    import train_student

    first = _set(base_argv("train", paths), "--exp_dir", paths["tmp"] + "/flags1")
    train_student.main(train_student.get_args_parser().parse_args(first))
    ckpt = os.path.join(paths["tmp"], "flags1", "checkpoints", "checkpoint_latest.pth")
    argv = _set(first, "--exp_dir", paths["tmp"] + "/flags2") + ["--mse_nonorm", "--resume", ckpt, "--restart"]
    with caplog.at_level(logging.INFO):
        stats = train_student.main(train_student.get_args_parser().parse_args(argv))
    assert "--mse_nonorm has no effect here: both vectors are L2-normalised" in caplog.text
    assert f"--restart: starting a new run from the weights of {ckpt}" in caplog.text
    assert "student backbone and head initialised from" in caplog.text and stats["epoch"] == 1
