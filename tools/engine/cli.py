"""What every command shares: the user-error wrapper, validated flag types and shared argument groups.

A flag's range is checked when it is parsed (``type=`` below): a wrong value ends with argparse's one
line naming the flag and exit status 2 before any work starts. Paths are checked first thing in
``main`` by :func:`check_paths` (so ``--help`` and parsing never touch the disk), with the same
one-sentence answer through :func:`run_cli`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from models.errors import UserError

# The argument groups import the data and model packages when they are built: a command that needs
# none of them (tools.plot, tools.eval_summary) starts without torch, torchvision and timm (2-5 s).

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
        report_error(user_message(exc))
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside training's save-and-exit (start-up, evaluation, caching)
        if os.environ.get("RANK", "0") == "0":
            print("interrupted by Ctrl-C; rerun the same command (caches, embeddings and the linear probe continue "
                  "from what they saved)", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(130)


def report_error(message: str) -> None:
    """``error: <message>`` as one line on stderr (rank 0 only under several processes, where every rank
    finds the same mistake), and into the log file when one is open."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
        _record_for_launcher(message)  # after printing: the launcher then knows rank 0 has said it
    elif not _record_for_launcher(message):
        print(f"error: {message}", file=sys.stderr, flush=True)
    logger = logging.getLogger("simreg")
    if logger.hasHandlers():  # else logging's last resort would print it to the console a second time
        logger.error("error: %s", message, extra={"file_only": True})


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's answer to a wrong command line: one line ``error: argument --x: ...``,
    exit status 2 (argparse's usage block is left to ``--help``; under several processes rank 0 prints it)."""

    def error(self, message: str):
        report_error(f"{message} (see --help)")
        sys.exit(2)


def _record_for_launcher(message: str) -> bool:
    """Under torchrun, leave the sentence in the error file the launcher reads (``tools.launch`` prints the
    first failing rank's when rank 0 has not printed its own); False when there is no such file."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time()), "user_error": True}, f)
    except OSError:
        return False
    return True


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
fraction_float = _number(float, 1e-6, 1.0, "a fraction in (0, 1]")


def width_x_height(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` in pixels, each between 8 and 8192 (e.g. ``500x375``)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels (e.g. 500x375), got {text!r}") from None
    if not (8 <= width <= 8192 and 8 <= height <= 8192):
        raise argparse.ArgumentTypeError(f"expected a width and height between 8 and 8192 pixels, got {text}")
    return width, height


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked when it is picked)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


# ============ checking paths before work starts ============
def check_output_file(flag: str, path: str | None) -> None:
    """A UserError when a file to be written is a folder or lies under an existing file."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a folder; give the file to write")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} '{path}' lies under '{parent}', which is a file; give another path")


def check_output_folder(flag: str, path: str | None) -> None:
    """A UserError when a folder to be written into (created if missing) is an existing file."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a file; give a folder")


def check_npy_output(out: str, crop_size: int | None, resize_size: int | None) -> None:
    """``--out`` of a command writing FILE.npy (and its JSON beside it), and its centre-crop sizes (None: not
    given, decided later)."""
    if not out.endswith(".npy"):
        raise UserError(f"--out '{out}' must end in .npy (a NumPy array file)")
    if os.path.isdir(out):
        raise UserError(f"--out '{out}' is a folder; give the FILE.npy to write")
    if crop_size and resize_size and crop_size > resize_size:
        raise UserError(f"--crop_size {crop_size} is larger than --resize_size {resize_size}")


def check_paths(
    *, files: dict[str, str | None] = (), folders: dict[str, str | None] = (), weights: dict[str, str | None] = ()
) -> None:
    """A UserError naming the first flag whose path is not an existing file (``files``) or folder; ``weights``:
    a checkpoint file or a Hugging Face snapshot folder (config.json with its weights)."""
    files = dict(files)
    for flag, path in dict(weights).items():
        if path and os.path.isdir(path):
            from models.hf_checkpoints import check_snapshot  # imported here: --help stays free of timm

            check_snapshot(path, flag)
        else:
            files[flag] = path
    for flag, path in files.items():
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
    check_fits(need, f"{flag} {batch} at {size} px", "one float batch", "choose a smaller batch or image size")


def check_fits(need: int, what: str, holds: str, fix: str) -> None:
    """Refuse ``what`` when the ``need`` bytes it takes (``holds``) exceed this machine's memory."""
    total = _memory_bytes()
    if total and need > total:
        raise UserError(
            f"{what} needs {need / 2**30:.0f} GiB for {holds}, more than this machine's "
            f"{total / 2**30:.0f} GiB of memory; {fix}"
        )


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ============ flags with one value or one per teacher ============
class OneOrMany(argparse.Action):
    """``--flag V`` stores ``V``; ``--flag V1 V2 ...`` stores the list; a bare ``--flag`` stores ``const``.

    One value keeps the single-teacher meaning of the original's flags (``args.arch_teacher`` is a string);
    several give one value per teacher. Values stay strings: they are checked when the run is assembled.
    """

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        values = list(values)
        setattr(namespace, self.dest, self.const if not values else values[0] if len(values) == 1 else values)


def as_list(value: object) -> list:
    """A flag's value as a list (None -> [], a single value -> [value])."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class DataLastParser(ArgumentParser):
    """An ArgumentParser whose ``data`` positional may follow a flag that takes several values.

    argparse gives every value after ``--teacher_weights`` to that flag, so the original's command line
    ``... --teacher_weights FILE /path/to/imagenet`` would leave no data root; here, when ``data`` is
    missing, the last value of such a flag goes back to ``data``.
    """

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        ns, extras = super().parse_known_args(argv, namespace)
        if getattr(ns, "data", "") is None:
            ns.data = self._take_back_last_value(argv, ns)
            if ns.data is None:
                self.error("the following arguments are required: data (the dataset root)")
        return ns, extras

    def _take_back_last_value(self, argv: list[str], ns: argparse.Namespace) -> str | None:
        """The data root a list-valued flag swallowed: the last value of the last such flag on the line
        (one whose last value is an existing folder wins), taken out of that flag's values."""
        candidates = []
        for i, token in enumerate(argv):
            action = self._option_string_actions.get(token)
            if not isinstance(action, OneOrMany):
                continue
            values = []
            for value in argv[i + 1 :]:
                if value.startswith("-") and value != "-":
                    break
                values.append(value)
            if len(values) >= (1 if action.nargs == "*" else 2):
                candidates.append((action, values[-1]))
        folders = [c for c in candidates if os.path.isdir(c[1])]
        for action, value in (folders or candidates)[-1:]:
            stored = as_list(getattr(ns, action.dest))
            if stored[-1:] == [value]:
                rest = stored[:-1]
                setattr(ns, action.dest, action.const if not rest else rest[0] if len(rest) == 1 else rest)
                return value
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


def add_layout_arg(g: argparse._ArgumentGroup) -> None:
    """``--layout``: how a folder of training images is read (training, the cache builder, tools.make_shards)."""
    g.add_argument("--layout", default="auto", choices=("auto", "classes", "images"),
                   help="a folder's layout: classes (DATA[/train]/<class>/<image>, labelled), images (every image "
                   "under it, any nesting, no labels); auto = classes when it has sub-folders")  # fmt: skip


def add_view_args(g: argparse._ArgumentGroup) -> None:
    """The training views (crop size, view mode, crop scale, flip, decoder): training and the K-view cache
    builder share them."""
    from data.device_decode import DECODE_CHOICES
    from data.transforms import PAPER_MIN_SCALE

    g.add_argument("--image_size", type=image_size_int, default=224, help="training crop size in pixels")
    g.add_argument("--single_aug", action="store_true", help="one view fed to both networks (the paper's best)")
    g.add_argument("--weak_weak", action="store_true", help="weak augmentation for teacher and student")
    g.add_argument("--weak_strong", action="store_true", help="weak view for the teacher, strong for the student")
    g.add_argument("--min_crop_scale", type=crop_scale, default=PAPER_MIN_SCALE,
                   help="RandomResizedCrop's smallest area fraction in the training views (0.2: the paper's; small "
                   "centred objects such as the demo's digits want a larger one)")  # fmt: skip
    g.add_argument("--no_flip", action="store_true", help="no horizontal flip in the training views (text, digits)")
    g.add_argument("--decode", default="auto", choices=DECODE_CHOICES,
                   help="JPEG decoding of the single weak view: gpu (batched, on the device), cpu (in the workers), "
                   "pil, draft, tv; auto = gpu on CUDA for JPEG files, else cpu")  # fmt: skip


def add_teacher_args(
    g: argparse._ArgumentGroup, arch_names: list[str], weights_required: bool = False, several: bool = False
) -> None:
    """The teacher flags of training (``several``: one value for all teachers or one per teacher) and of
    the cache builder (one teacher)."""
    from models.formats import FORMATS

    many = {"nargs": "+", "action": OneOrMany} if several else {}
    each = " (one for all teachers, or one per teacher)" if several else ""
    g.add_argument(
        "--arch_teacher",
        default=None,
        help=f"teacher architecture, one of {', '.join(arch_names)}; default: from the file{each}",
        **many,
    )
    g.add_argument(
        "--teacher_weights",
        default=None,
        required=weights_required,
        help="teacher checkpoint file(s), any format" + (": several files distil several teachers" if several else ""),
        **many,
    )
    g.add_argument(
        "--teacher_format", default="auto", help=f"teacher checkpoint layout: auto, {', '.join(FORMATS)}{each}", **many
    )
    fc_help = "regress the checkpoint's projection output (MoCo fc, SwAV projection_head, ...), not its pooled feature"
    if several:  # a bare --teacher_fc: every teacher; --teacher_fc yes no: per teacher
        g.add_argument("--teacher_fc", nargs="*", action=OneOrMany, const=True, default=False,
                       help=fc_help + "; bare: every teacher, or yes/no per teacher")  # fmt: skip
    else:
        g.add_argument("--teacher_fc", action="store_true", help=fc_help)
    add_pool_arg(g, several)


def add_objective_args(g: argparse._ArgumentGroup) -> None:
    """``--loss`` and the flags of the dense objectives (docs/dense.md)."""
    from models.simreg import OBJECTIVES

    g.add_argument("--loss", default="global", choices=OBJECTIVES,
                   help="global: regress the pooled feature (the paper); dense: the teacher's feature map (a "
                        "ViT's patch tokens) with a dense head on the student's map; both (docs/dense.md)")  # fmt: skip
    g.add_argument("--dense_weight", type=nonneg_float, default=None,
                   help="--loss both: the dense term's weight (loss = global + W * dense; default 1)")  # fmt: skip
    g.add_argument("--dense_blocks", type=positive_int, default=None,
                   help="--loss dense/both with ViT teachers: the last N blocks' normalised patch tokens, "
                        "concatenated (default 1: the final ones)")  # fmt: skip


TEACHER_POOLS = ("auto", "cls", "avg", "cls+avg")


def add_pool_arg(g: argparse._ArgumentGroup, several: bool = False) -> None:
    """``--teacher_pool``: a ViT teacher's feature (training, caching and evaluation share it)."""
    what = ("ViT teachers: final-norm class token (cls; auto = the publisher's), mean of the patch tokens (avg), "
            "or both concatenated (cls+avg, as DINOv2's linear evaluation)")  # fmt: skip
    if several:  # checked per teacher when the run is assembled
        g.add_argument("--teacher_pool", default="auto", nargs="+", action=OneOrMany,
                       help=f"{what}; one for all teachers or one per teacher")  # fmt: skip
    else:
        g.add_argument("--teacher_pool", default="auto", choices=TEACHER_POOLS, help=what)


def default_workers(most: int = 8) -> int:
    """Loader processes by default: ``most``, or fewer on a machine with fewer CPU cores for this process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(most, cores))


def add_workers_arg(g: argparse._ArgumentGroup, dest: str, default: int | None = None, what: str = "per process"):
    """The loader-process count under both of its names: ``--num_workers`` (training, the cache builder) and
    ``--workers``/``-j`` (the evaluation scripts, PyTorch's ImageNet example); ``dest`` keeps each command's
    attribute name. The default is 8, capped at this process's CPU cores."""
    names = ("--num_workers", "--workers", "-j") if dest == "num_workers" else ("-j", "--workers", "--num_workers")
    why = f"{default}" if default is not None else f"{default_workers()}: 8, at most the CPU cores"
    help_text = f"data loading processes {what} (default {why}; 0: in the main process)"
    default = default_workers() if default is None else default
    g.add_argument(*names, dest=dest, type=nonneg_int, default=default, metavar="N", help=help_text)


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
