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
        logging.getLogger("simreg").error("error: %s", exc)
        sys.exit(2)


def resolve_exp_dir(exp_dir: str | None, base_dir: str, exp: str) -> str:
    """``--exp_dir`` if given, else the original's ``<base_dir>/exp/<exp>``."""
    return os.path.abspath(exp_dir or os.path.join(base_dir, "exp", exp))


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
