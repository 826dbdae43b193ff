"""ViT checkpoint layouts: the publisher's key names and shapes -> a :class:`ViTSpec` and timm's names.

Each function takes a flat state dict with the publisher's backbone names (prefixes such as
``module.``, ``backbone.`` or ``base_encoder.`` already removed). The head count is not in the shapes:
it is each publisher's constructor for the width (``HEADS``), so MoCo v3's ViT-S gets its 12 heads
where timm's and DINO's ViT-S have 6 (identical shapes, other features).

Checked against: facebookresearch/dino ``vision_transformer.py`` (``vit_tiny/small/base``),
facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``, ``dinov2/layers/*`` and
``dinov2/hub/backbones.py``, facebookresearch/dinov3 ``dinov3/models/vision_transformer.py``,
``dinov3/layers/*`` and ``dinov3/hub/backbones.py``, facebookresearch/moco-v3 ``vits.py`` and
``moco/builder.py``.
"""

from __future__ import annotations

import math
import re

import torch

from models.io import CheckpointError
from models.vit import ViTSpec, mocov3_sincos

# publisher -> {width: heads}, from each project's constructors
HEADS = {
    "dino": {192: 3, 384: 6, 768: 12},  # vit_tiny / vit_small / vit_base
    "dinov2": {384: 6, 768: 12, 1024: 16, 1536: 24},  # vit_small / base / large / giant2
    "dinov3": {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32},  # S, S+, B, L, L+, H+, 7B
    "mocov3": {384: 12, 768: 12},  # vit_small has 12 heads of width 32
}
PUBLISHER = {"dino": "DINO", "dinov2": "DINOv2", "dinov3": "DINOv3", "mocov3": "MoCo v3"}


def is_vit(sd: dict) -> bool:
    """True for a state dict with a ViT's class token, patch embedding and attention blocks."""
    return "cls_token" in sd and "patch_embed.proj.weight" in sd and any(".attn.qkv.weight" in k for k in sd)


def unchunk(sd: dict) -> dict:
    """DINOv2 training checkpoints with ``block_chunks`` store ``blocks.<chunk>.<i>.``: back to ``blocks.<i>.``."""
    if not any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        return sd
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


def is_mocov3_sincos(pos: torch.Tensor) -> bool:
    """True when ``pos`` (1, 1 + M*M, D) is MoCo v3's fixed sin-cos embedding (no other ViT stores one)."""
    m = math.isqrt(pos.shape[1] - 1)
    if m * m != pos.shape[1] - 1 or pos.shape[-1] % 4:
        return False
    return torch.allclose(pos.float(), mocov3_sincos(m, m, pos.shape[-1]), atol=1e-5)


def family_of(sd: dict) -> str:
    """Which publisher's ViT ``sd`` is, from its keys (and MoCo v3's fixed position embedding)."""
    if "rope_embed.periods" in sd or "storage_tokens" in sd:
        return "dinov3"
    if "mask_token" in sd or "register_tokens" in sd or "blocks.0.ls1.gamma" in sd:
        return "dinov2"
    if "pos_embed" in sd and is_mocov3_sincos(sd["pos_embed"]):
        return "mocov3"
    return "dino"


def _ffn(sd: dict) -> tuple[str, int]:
    for key, kind in (("mlp.fc1", "mlp"), ("mlp.w12", "swiglu_packed"), ("mlp.w1", "swiglu")):
        if f"blocks.0.{key}.weight" in sd:
            return kind, sd[f"blocks.0.{key}.weight"].shape[0]
    raise CheckpointError("the ViT's first block has no known feed-forward weights (mlp.fc1, mlp.w12 or mlp.w1)")


def vit_spec(sd: dict, family: str) -> ViTSpec:
    """The network the shapes of ``sd`` describe, with the heads of ``family``'s constructor for its width."""
    width = sd["cls_token"].shape[-1]
    heads = HEADS[family].get(width)
    if heads is None:
        known = ", ".join(str(w) for w in HEADS[family])
        raise CheckpointError(
            f"it holds a ViT of width {width}; {PUBLISHER[family]} publishes widths {known} only, so its "
            "head count is unknown (check --teacher_format)"
        )
    proj = sd["patch_embed.proj.weight"]
    if proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"its patch {tuple(proj.shape[-2:])} is not square; not a published ViT")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    ffn, hidden = _ffn(sd)
    common = dict(family=family, width=width, depth=depth, heads=heads, patch=proj.shape[-1], hidden=hidden, ffn=ffn)
    common.update(layerscale="blocks.0.ls1.gamma" in sd, qkv_bias="blocks.0.attn.qkv.bias" in sd)
    if family == "dinov3":
        storage = sd.get("storage_tokens")
        return ViTSpec(**common, grid=0, n_reg=storage.shape[1] if storage is not None else 0, eps=1e-5, pos="rope")
    n = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise CheckpointError(
            f"its pos_embed holds {n} positions after the class token, not a square grid (a timm file without a "
            "class-token position, e.g. a timm _reg4 model? then pass --arch_teacher timm/<name>)"
        )
    regs = sd.get("register_tokens")
    n_reg = regs.shape[1] if regs is not None else 0
    # DINOv2 hub: interpolate_offset 0.1 / no antialias; its _reg models: offset 0 (size-based) with antialias
    pos = {"mocov3": "sincos", "dinov2": "antialias" if n_reg else "offset"}.get(family, "offset")
    return ViTSpec(**common, grid=grid, n_reg=n_reg, pos=pos)


def _dinov3_qkv_bias(sd: dict, block: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_bias, v_bias) of a DINOv3 block: the stored bias times ``bias_mask``, whose key third must be 0.

    timm keeps the key bias at zero; with RoPE a key bias would change the attention, so an unmasked
    non-zero one (or a mask that is not 1/0/1) is refused rather than dropped.
    """
    bias = sd[f"{block}.attn.qkv.bias"].float()
    mask = sd.get(f"{block}.attn.qkv.bias_mask")
    if mask is not None:
        q_m, k_m, v_m = mask.float().chunk(3)
        if not (bool((q_m == 1).all()) and bool((k_m == 0).all()) and bool((v_m == 1).all())):
            raise CheckpointError(
                f"{block}.attn.qkv.bias_mask is not ones on the query and value parts and zeros on the "
                "key part (uninitialised?); DINOv3's released files mask exactly the key bias"
            )
        bias = bias * mask.float()
    q, k, v = bias.chunk(3)
    if bool(k.abs().max() > 0):
        raise CheckpointError(
            f"{block} has a non-zero key bias without a bias_mask; timm's DINOv3 network keeps the "
            "key bias at zero, so these weights cannot be computed exactly"
        )
    return q, v


DINOV3_RENAMES = (("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2"), ("mlp.w1.", "mlp.fc1_g."),
                  ("mlp.w2.", "mlp.fc1_x."), ("mlp.w3.", "mlp.fc2."))  # fmt: skip


def _dinov3_to_timm(sd: dict) -> tuple[dict, list[str]]:
    if any(k.startswith("cls_norm.") for k in sd):
        raise CheckpointError(
            "it has a separate class-token norm (cls_norm, DINOv3's untie_cls_and_patch_norms), which no "
            "released DINOv3 backbone uses and timm cannot build"
        )
    out, dropped = {}, []
    for k, v in sd.items():
        if k in ("mask_token", "rope_embed.periods") or k.startswith("local_cls_norm.") or k.endswith(".bias_mask"):
            # mask_token: pretraining only; local_cls_norm: local crops in training only (never in eval);
            # periods and bias_mask are applied below, not loaded as weights
            dropped += [k] if k == "mask_token" or k.startswith("local_cls_norm.") else []
            continue
        if k.endswith(".attn.qkv.bias"):
            block = k[: -len(".attn.qkv.bias")]
            out[f"{block}.attn.q_bias"], out[f"{block}.attn.v_bias"] = _dinov3_qkv_bias(sd, block)
            continue
        for old, new in DINOV3_RENAMES:
            k = k.replace(old, new)
        out["reg_token" if k == "storage_tokens" else k] = v
    return out, dropped


def to_timm(sd: dict, family: str) -> tuple[dict, list[str]]:
    """``sd`` renamed to timm's names for the network of :func:`vit_spec`, and the keys dropped on purpose.

    DINO and MoCo v3 already use timm's names. DINOv2: ``register_tokens`` -> ``reg_token``, SwiGLU
    ``w12`` / ``w3`` -> ``fc1`` / ``fc2``, ``mask_token`` dropped. DINOv3: storage tokens -> ``reg_token``,
    LayerScale ``ls1/ls2.gamma`` -> ``gamma_1/2``, masked ``qkv.bias`` -> ``q_bias`` / ``v_bias``, SwiGLU
    ``w1/w2/w3`` -> ``fc1_g/fc1_x/fc2``. Any other key is kept, so a strict load names it.
    """
    if family == "dinov3":
        return _dinov3_to_timm(sd)
    if family != "dinov2":
        return dict(sd), []
    out, dropped = {}, []
    for k, v in sd.items():
        if k == "mask_token":  # iBOT masking in pretraining; unused at inference
            dropped.append(k)
            continue
        k = "reg_token" if k == "register_tokens" else k.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")
        out[k] = v
    return out, dropped
