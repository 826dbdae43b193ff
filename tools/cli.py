"""What the entry scripts share: the user-error wrapper and the experiment folder."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from models.errors import UserError


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
    """``--exp_dir`` if given, else the original's ``<base_dir>/exp/<exp>``."""
    return os.path.abspath(exp_dir or os.path.join(base_dir, "exp", exp))


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
