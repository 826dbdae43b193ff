"""Reading Hugging Face snapshots from disk: a folder, or a bare weights file, never a download.

A snapshot folder holds ``config.json`` and the weights as ``model.safetensors``, as shards
``model-0000k-of-0000n.safetensors`` listed in ``model.safetensors.index.json`` (``weight_map``: tensor ->
shard), or as an old ``pytorch_model.bin`` (read with ``weights_only=True`` like every checkpoint here);
``preprocessor_config.json`` gives the input mean/std. No code from a snapshot is ever run (nothing like
``trust_remote_code``): only ``config.json``'s numbers and the tensors are read. A bare weights file
is read as is; a ``config.json`` lying beside it (a snapshot's own file passed directly) is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from models.errors import UserError
from models.hf_layouts import TOWER_DROPS, HFCheckpoint, family_of_keys
from models.io import CheckpointError, file_sha256, safe_load

log = logging.getLogger(__name__)

# The weights of a snapshot, in the order transformers prefers them.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SIDE_FILES = ("config.json", "preprocessor_config.json")


def is_snapshot(path: str | None) -> bool:
    """True when ``path`` is a folder (a snapshot, or a folder given by mistake: :func:`check_snapshot` says)."""
    return bool(path) and os.path.isdir(path)


def check_snapshot(folder: str, flag: str = "--teacher_weights") -> None:
    """A UserError unless ``folder`` holds ``config.json`` and the weights of a Hugging Face snapshot."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(
            f"{flag} '{folder}' is a folder without config.json; give a checkpoint file, or a Hugging Face snapshot "
            "folder (config.json with model.safetensors, its shards, or pytorch_model.bin)"
        )
    if _weights_file(folder) is None:
        raise UserError(
            f"{flag} '{folder}' holds config.json but no model.safetensors, model.safetensors.index.json or "
            "pytorch_model.bin; download the snapshot's weights too"
        )


def _weights_file(folder: str) -> str | None:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return name
    return None


def _read_json(path: str, what: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what} '{path}' is not readable JSON ({exc}); download it again") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} '{path}' is not a JSON object; download it again")
    return data


def _shards(folder: str, index_name: str) -> tuple[list[str], dict[str, str]]:
    """(the shard files, tensor -> shard) of a sharded snapshot; a missing shard is named."""
    index = _read_json(os.path.join(folder, index_name), "shard index") or {}
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"'{os.path.join(folder, index_name)}' has no weight_map; download it again")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise CheckpointError(
            f"'{folder}' lacks {len(missing)} of the {len(shards)} shards {index_name} lists "
            f"({', '.join(missing[:4])}); the download is incomplete: fetch the missing shard(s)"
        )
    return shards, weight_map


def _read_safetensors(path: str, keep) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors whose name ``keep`` accepts, the names left unread) of one safetensors file, on the CPU."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            return {k: f.get_tensor(k) for k in names if keep(k)}, [k for k in names if not keep(k)]
    except Exception as exc:  # the parser's own error on a truncated or foreign file
        raise CheckpointError(f"'{path}' is not a readable safetensors file (truncated?): {exc}") from exc


def _read_weights(folder: str, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors, names left unread: a whole CLIP/SigLIP file's text tower) of a snapshot's weights."""
    keep = lambda k: not k.startswith(TOWER_DROPS[:2])  # noqa: E731  (text_model.*, text_projection.*)
    if name == "model.safetensors":
        return _read_safetensors(os.path.join(folder, name), keep)
    if name == "pytorch_model.bin":
        sd = safe_load(os.path.join(folder, name), "pytorch_model.bin")
        return _tensor_dict(sd, os.path.join(folder, name)), []
    shards, weight_map = _shards(folder, name)
    tensors, unread = {}, []
    for shard in shards:
        path = os.path.join(folder, shard)
        if shard.endswith(".safetensors"):
            got, skipped = _read_safetensors(path, keep)
        else:
            got, skipped = _tensor_dict(safe_load(path, "weights shard"), path), []
        tensors.update(got)
        unread += skipped
    absent = [k for k in weight_map if k not in tensors and k not in unread]
    if absent:
        raise CheckpointError(
            f"'{folder}': {len(absent)} tensor(s) that {name} places in a shard are not in it "
            f"({', '.join(absent[:4])}); a shard is truncated or from another download: fetch it again"
        )
    return tensors, unread


def _tensor_dict(sd: object, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"'{path}' is not a plain state dict of tensors, as transformers writes them")
    return sd


def read_snapshot(folder: str) -> HFCheckpoint:
    """``config.json``, ``preprocessor_config.json`` and the weights of a snapshot folder."""
    check_snapshot(folder)
    name = _weights_file(folder)
    tensors, unread = _read_weights(folder, name)
    config = _read_json(os.path.join(folder, "config.json"), "config.json")
    pre = _read_json(os.path.join(folder, "preprocessor_config.json"), "preprocessor_config.json")
    log.info("Hugging Face snapshot %s: %s, model_type %s", folder, name, config.get("model_type"))
    return HFCheckpoint(tensors, config, pre, folder, unread)


def read_weights(path: str, what: str = "teacher") -> object:
    """A snapshot folder as an :class:`HFCheckpoint`; a file as :func:`models.io.safe_load` reads it, wrapped
    with the ``config.json`` beside it when it holds a supported Hugging Face model's tensors."""
    if is_snapshot(path):
        return read_snapshot(path)
    raw = safe_load(path, what)
    folder = os.path.dirname(os.path.abspath(path))
    config = _read_json(os.path.join(folder, "config.json"), "config.json")
    keyed = isinstance(raw, dict) and all(isinstance(k, str) for k in raw)
    if config is None or "model_type" not in config or not keyed or family_of_keys(raw) is None:
        return raw
    log.info("%s: reading config.json (and preprocessor_config.json, if any) beside it", path)
    pre = _read_json(os.path.join(folder, "preprocessor_config.json"), "preprocessor_config.json")
    return HFCheckpoint(_tensor_dict(raw, path), config, pre, path)


def snapshot_sha256(folder: str) -> str:
    """One SHA-256 over the files a snapshot's teacher is built from (config, preprocessing, weights)."""
    name = _weights_file(folder)
    files = [f for f in SIDE_FILES if os.path.isfile(os.path.join(folder, f))]
    if name is not None:
        files.append(name)
        if name.endswith(".index.json"):
            files += _shards(folder, name)[0]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}:{file_sha256(os.path.join(folder, f))}\n".encode())
    return h.hexdigest()
