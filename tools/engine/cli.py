"""What every command shares: the user-error wrapper, validated flag types and shared argument groups.

A flag's range is checked when it is parsed (``type=`` below): a wrong value ends with argparse's one
line naming the flag and exit status 2 before any work starts. Paths are checked first thing in
``main`` by :func:`check_paths` (so ``--help`` and parsing never touch the disk), with the same
one-sentence answer through :func:`run_cli`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from models.errors import UserError
from models.formats import FORMATS

log = logging.getLogger("simreg")


# ============ running a command ============
def run_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """Run ``main(args)``; a user mistake ends with one clear line and exit status 2.

    With ``--debug`` the full traceback is shown instead.
    """
    try:
        main(args)
    except UserError as exc:
        if getattr(args, "debug", False):
            raise
        logging.getLogger("simreg").error("error: %s", user_message(exc))
        sys.exit(2)


def user_message(exc: BaseException) -> str:
    """The error's own sentence; an error re-raised from a DataLoader worker carries the worker's
    traceback in its text, of which only the last line (the original message) is kept."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return text


def resolve_exp_dir(exp_dir: str | None, base_dir: str, exp: str) -> str:
    """``--exp_dir`` if given, else the original's ``<base_dir>/exp/<exp>``; refused if it is a file."""
    path = os.path.abspath(exp_dir or os.path.join(base_dir, "exp", exp))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"experiment folder '{path}' is an existing file; give a folder path with --exp_dir")
    return path


# ============ validated flag types (argparse prints "argument --x: <message>", exit status 2) ============
def _number(kind: type, low: float | None, high: float | None, what: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 1, None, "a positive integer")
nonneg_int = _number(int, 0, None, "an integer >= 0")
nonneg_float = _number(float, 0.0, float("inf"), "a number >= 0")
positive_float = _number(float, 1e-300, float("inf"), "a number > 0")
momentum_float = _number(float, 0.0, 0.999999, "a number in [0, 1)")
image_size_int = _number(int, 8, 4096, "an image size in pixels between 8 and 4096")
crop_scale = _number(float, 1e-6, 1.0, "an area fraction in (0, 1]")


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked when it is picked)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


# ============ checking paths before work starts ============
def check_paths(*, files: dict[str, str | None] = (), folders: dict[str, str | None] = ()) -> None:
    """A UserError naming the first flag whose path is not an existing file (``files``) or folder."""
    for flag, path in dict(files).items():
        if path and not os.path.isfile(path):
            what = "is a folder" if os.path.isdir(path) else "does not exist"
            raise UserError(f"{flag} '{path}' {what}; give an existing file")
    for flag, path in dict(folders).items():
        if path and not os.path.isdir(path):
            what = "is a file" if os.path.exists(path) else "does not exist"
            raise UserError(f"{flag} folder '{path}' {what}; check the path")


def check_batch_fits(batch: int, size: int, flag: str = "--batch_size") -> None:
    """Refuse a batch whose uint8 images alone would not fit in this machine's memory."""
    need = batch * 3 * size * size * 4  # the float32 copy of one batch, before any activation
    total = _memory_bytes()
    if total and need > total:
        raise UserError(
            f"{flag} {batch} at {size} px needs {need / 2**30:.0f} GiB for one float batch, more than this "
            f"machine's {total / 2**30:.0f} GiB of memory; choose a smaller batch or image size"
        )


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ============ shared argument groups ============
DATASETS = ("imagenet", "imagenet100", "imagenet-lt")


def add_dataset_args(g: argparse._ArgumentGroup, what: str = "train on") -> None:
    """``--dataset`` and ``--class_list`` (training, caching and evaluation share them)."""
    g.add_argument(
        "--dataset",
        default="imagenet",
        choices=DATASETS,
        help="imagenet100: the original's 100-class subset (seeded draw over the class folders); "
        "imagenet-lt: the folders as given (accepted from the original's k-NN script)",
    )
    g.add_argument("--class_list", default=None, help=f"file of class folder names to {what}, one per line")


def add_teacher_args(g: argparse._ArgumentGroup, arch_names: list[str], weights_required: bool = False) -> None:
    """The teacher flags of training and of the cache builder."""
    g.add_argument(
        "--arch_teacher",
        default=None,
        help=f"teacher architecture, one of {', '.join(arch_names)}; default: from the file",
    )
    g.add_argument(
        "--teacher_weights", default=None, required=weights_required, help="teacher checkpoint file (any format)"
    )
    g.add_argument("--teacher_format", default="auto", help=f"teacher checkpoint layout: auto, {', '.join(FORMATS)}")
    g.add_argument(
        "--teacher_fc",
        action="store_true",
        help="regress the checkpoint's projection output (MoCo fc, SwAV projection_head, ...), not its pooled feature",
    )
    add_pool_arg(g)


TEACHER_POOLS = ("auto", "cls", "avg", "cls+avg")


def add_pool_arg(g: argparse._ArgumentGroup) -> None:
    """``--teacher_pool``: a ViT teacher's feature (training, caching and evaluation share it)."""
    g.add_argument(
        "--teacher_pool",
        default="auto",
        choices=TEACHER_POOLS,
        help="ViT teachers: final-norm class token (cls; auto = the publisher's), mean of the patch tokens (avg), "
        "or both concatenated (cls+avg, as DINOv2's linear evaluation)",
    )


def add_runtime_args(g: argparse._ArgumentGroup, seed: bool = True) -> None:
    """``--device``, ``--seed`` and ``--debug``."""
    g.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda or cuda:N")
    if seed:
        g.add_argument("--seed", type=nonneg_int, default=0, help="data order, augmentation and initialisation")
    add_debug_flag(g)


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")


def note_ignored(flag: str, why: str) -> None:
    """One log line for an original flag that has no effect here (accepted so old command lines run)."""
    log.warning("%s has no effect here: %s", flag, why)
