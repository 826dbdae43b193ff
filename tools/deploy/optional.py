"""Optional packages (onnx, onnxruntime, onnxscript, safetensors, timm, submitit): one sentence when one is missing."""

from __future__ import annotations

import importlib.util

from models.errors import UserError


def require(modules: tuple[str, ...], what: str) -> None:
    """A UserError naming the optional packages ``what`` needs when any of them is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"{what} needs the optional package(s) {', '.join(missing)}: pip install {' '.join(missing)} "
            "(or pip install -r requirements-dev.txt)"
        )
