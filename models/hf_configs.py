"""Hugging Face vision configs: ``config.json`` (or a bare file's tensor shapes) -> :class:`HFSpec`.

What transformers builds for each supported ``model_type``, read from its configuration classes
(transformers 5.24.0, ``models/<type>/configuration_<type>.py``): the class defaults for the fields a
``config.json`` leaves out (``DEFAULTS``), the activation names, and for a bare weights file the model
type's published constructors (``HEADS``: the head count is not in the shapes). The input mean/std
comes from ``preprocessor_config.json``, else from the model type's published values (``MEAN_STD``).
"""

from __future__ import annotations

import math
import re

from models.hf_networks import HFSpec
from models.io import CheckpointError

# model_type in config.json -> the family read here
FAMILIES = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_with_registers",
    "dinov3_vit": "dinov3_vit",
    "dinov3_convnext": "dinov3_convnext",
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "vit": "vit",
}
LABELS = {
    "dinov2": "DINOv2",
    "dinov2_with_registers": "DINOv2 with registers",
    "dinov3_vit": "DINOv3 ViT",
    "dinov3_convnext": "DINOv3 ConvNeXt",
    "clip": "CLIP",
    "siglip": "SigLIP",
    "vit": "ViT",
}
REFUSED = {
    "siglip2": "SigLIP 2's NaFlex models (variable resolution, Siglip2Model) are not supported; use a "
    "fixed-resolution SigLIP 2 checkpoint (e.g. google/siglip2-base-patch16-224, model_type siglip)",
}

# The published constructors' heads per width, for a bare weights file (not in the shapes).
HEADS = {
    "dinov2": {384: 6, 768: 12, 1024: 16, 1536: 24},  # dinov2-small/base/large/giant
    "dinov3_vit": {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32},  # S, S+, B, L, H+, 7B
    "siglip": {768: 12, 1024: 16, 1152: 16, 1536: 16},  # base, large, so400m, giant-opt
}
HEADS["dinov2_with_registers"] = HEADS["dinov2"]

# Each config class's defaults (transformers 5.24.0), for config.json files that leave a field out.
DEFAULTS = {
    "dinov2": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=224,
        patch_size=14,
        qkv_bias=True,
        use_swiglu_ffn=False,
    ),
    "dinov3_vit": dict(
        patch_size=16,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=6,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        rope_theta=100.0,
        query_bias=True,
        key_bias=False,
        value_bias=True,
        proj_bias=True,
        mlp_bias=True,
        num_register_tokens=0,
        use_gated_mlp=False,
    ),
    "dinov3_convnext": dict(
        hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], hidden_act="gelu", layer_norm_eps=1e-6
    ),
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "siglip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=True,
    ),
    "vit": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        image_size=224,
        patch_size=16,
        qkv_bias=True,
    ),
}
DEFAULTS["dinov2_with_registers"] = {**DEFAULTS["dinov2"], "patch_size": 16, "num_register_tokens": 4}
# transformers' activation names -> the module computing them (gelu_new is the same tanh approximation)
ACTS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# the model type's published preprocessing, when the snapshot has no preprocessor_config.json
MEAN_STD = {
    "dinov2": IMAGENET,
    "dinov2_with_registers": IMAGENET,
    "dinov3_vit": IMAGENET,
    "dinov3_convnext": IMAGENET,
    "clip": CLIP_MEAN_STD,
    "siglip": HALF,
    "vit": HALF,
}


# ---------------------------------------------------------------- the network: from config.json or the shapes
def _int_size(value: object, what: str) -> int:
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
        value = value[0]
    if not isinstance(value, int):
        raise CheckpointError(f"config.json has {what} {value!r}; only square sizes are supported")
    return value


def _act(cfg: dict) -> str:
    act = cfg.get("hidden_act")
    if act not in ACTS:
        raise CheckpointError(f"config.json has hidden_act {act!r}; supported: {', '.join(ACTS)}")
    return ACTS[act]


def vision_config(family: str, config: dict) -> dict:
    """The vision tower's config (CLIPModel / SiglipModel nest it) with the class's defaults filled in."""
    cfg = dict(config)
    if family in ("clip", "siglip") and isinstance(cfg.get("vision_config"), dict):
        cfg = dict(cfg["vision_config"])
    return {**DEFAULTS[family], **cfg}


def _dinov2_hidden(width: int, ratio: float, swiglu: bool) -> int:
    """Dinov2MLP: int(width * mlp_ratio); Dinov2SwiGLUFFN: two thirds of it rounded up to 8, packed twice."""
    hidden = int(width * ratio)
    return 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8) if swiglu else hidden


def _dinov3_config(cfg: dict) -> dict:
    """DINOv3 configs of the earlier conversion (mlp_ratio, use_swiglu_ffn, qkv_bias, pos_embed_rope_base)."""
    if "use_swiglu_ffn" in cfg and "use_gated_mlp" not in cfg:
        cfg["use_gated_mlp"] = cfg["use_swiglu_ffn"]
    if "mlp_ratio" in cfg and "intermediate_size" not in cfg:
        hidden = _dinov2_hidden(cfg["hidden_size"], cfg["mlp_ratio"], cfg["use_gated_mlp"])
        cfg["intermediate_size"] = hidden // 2 if cfg["use_gated_mlp"] else hidden
    cfg.setdefault("rope_theta", cfg.get("pos_embed_rope_base", 100.0))
    if "qkv_bias" in cfg:
        cfg.setdefault("query_bias", cfg["qkv_bias"])
        cfg.setdefault("value_bias", cfg["qkv_bias"])
        cfg.setdefault("key_bias", cfg["qkv_bias"] and not cfg.get("mask_k_bias", False))
    return {**DEFAULTS["dinov3_vit"], **cfg}


def spec_from_config(family: str, config: dict) -> HFSpec:
    """The network ``config.json`` describes (transformers' defaults for the fields it leaves out)."""
    cfg = _dinov3_config(dict(config)) if family == "dinov3_vit" else vision_config(family, config)
    if family == "dinov3_convnext":
        if cfg["hidden_act"] != "gelu":
            raise CheckpointError(f"config.json has hidden_act {cfg['hidden_act']!r}; DINOv3 ConvNeXt uses gelu")
        return HFSpec(
            family,
            width=cfg["hidden_sizes"][-1],
            depth=sum(cfg["depths"]),
            eps=cfg["layer_norm_eps"],
            pooled="mean",
            pos="none",
            dims=tuple(cfg["hidden_sizes"]),
            depths=tuple(cfg["depths"]),
        )
    width, patch = cfg["hidden_size"], _int_size(cfg["patch_size"], "patch_size")
    common = dict(
        width=width,
        depth=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        patch=patch,
        eps=cfg["layer_norm_eps"],
    )
    if family == "dinov3_vit":
        return _dinov3_spec(cfg, common)
    grid = _int_size(cfg["image_size"], "image_size") // patch
    if family.startswith("dinov2"):
        swiglu = bool(cfg["use_swiglu_ffn"])
        hidden = _dinov2_hidden(width, cfg["mlp_ratio"], swiglu)
        act = "silu" if swiglu else _act(cfg)
        return HFSpec(
            family,
            **common,
            grid=grid,
            hidden=hidden,
            ffn="swiglu_packed" if swiglu else "mlp",
            act=act,
            n_reg=cfg.get("num_register_tokens", 0) if family.endswith("registers") else 0,
            layerscale=True,
            pos="antialias" if family.endswith("registers") else "size",
            qkv_bias=bool(cfg["qkv_bias"]),
        )
    hidden, act = cfg["intermediate_size"], _act(cfg)
    if family == "clip":
        return HFSpec(family, **common, grid=grid, hidden=hidden, act=act, pre_norm=True)
    if family == "siglip":
        pooled = "head" if cfg["vision_use_head"] else "none"
        return HFSpec(family, **common, grid=grid, hidden=hidden, act=act, class_token=False, pooled=pooled)
    return HFSpec(family, **common, grid=grid, hidden=hidden, act=act, qkv_bias=bool(cfg["qkv_bias"]))  # vit


def _dinov3_spec(cfg: dict, common: dict) -> HFSpec:
    gated = bool(cfg["use_gated_mlp"])
    act = _act(cfg)
    if act != ("silu" if gated else "gelu"):
        raise CheckpointError(
            f"config.json has hidden_act {cfg['hidden_act']!r} with use_gated_mlp {gated}; DINOv3's networks use "
            "silu with the gated MLP and gelu without"
        )
    if cfg["query_bias"] != cfg["value_bias"] or not (cfg["proj_bias"] and cfg["mlp_bias"]):
        raise CheckpointError(
            "config.json sets query_bias/value_bias apart or turns proj_bias/mlp_bias off, which no published "
            "DINOv3 ViT does and these networks do not compute"
        )
    return HFSpec(
        "dinov3_vit",
        **common,
        hidden=cfg["intermediate_size"],
        ffn="swiglu" if gated else "mlp",
        act=act,
        n_reg=cfg["num_register_tokens"],
        layerscale=True,
        pos="rope",
        qkv_bias=bool(cfg["query_bias"]),
        rope_theta=float(cfg["rope_theta"]),
    )


def _depth(sd: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _heads(family: str, width: int) -> int:
    heads = HEADS[family].get(width)
    if heads is None:
        raise CheckpointError(
            f"it is a bare {LABELS[family]} file of width {width}, which no published {LABELS[family]} has, so "
            "its head count is not known: put the model's config.json beside it (or give the snapshot folder)"
        )
    return heads


def spec_from_shapes(family: str, sd: dict) -> HFSpec:
    """The network a bare weights file describes, with the model type's published constructor for the rest."""
    if family in ("clip", "vit"):
        missing = "activation (OpenAI's quick-GELU or GELU)" if family == "clip" else "LayerNorm eps and mean/std"
        raise CheckpointError(
            f"it is a bare {LABELS[family]} weights file whose {missing} cannot be read from its tensors: put "
            "the model's config.json beside it (or give the snapshot folder)"
        )
    if family == "dinov3_convnext":
        dims = tuple(sd[f"stages.{s}.layers.0.gamma"].shape[0] for s in range(_depth(sd, "stages.")))
        depths = tuple(_depth(sd, f"stages.{s}.layers.") for s in range(len(dims)))
        return spec_from_config(family, {"hidden_sizes": list(dims), "depths": list(depths)})
    shapes = {"siglip": _siglip_shapes, "dinov3_vit": _dinov3_shapes}.get(family, _dinov2_shapes)
    return spec_from_config(family, shapes(family, sd))


def _siglip_shapes(family: str, sd: dict) -> dict:
    width, patch = sd["embeddings.patch_embedding.weight"].shape[0], sd["embeddings.patch_embedding.weight"].shape[-1]
    return {
        "hidden_size": width,
        "patch_size": patch,
        "num_hidden_layers": _depth(sd, "encoder.layers."),
        "intermediate_size": sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        "image_size": math.isqrt(sd["embeddings.position_embedding.weight"].shape[0]) * patch,
        "num_attention_heads": _heads(family, width),
        "vision_use_head": "head.probe" in sd,
    }


def _dinov3_shapes(family: str, sd: dict) -> dict:
    width, gated = sd["embeddings.cls_token"].shape[-1], "layer.0.mlp.gate_proj.weight" in sd
    registers = sd.get("embeddings.register_tokens")
    return {
        "hidden_size": width,
        "patch_size": sd["embeddings.patch_embeddings.weight"].shape[-1],
        "num_hidden_layers": _depth(sd, "layer."),
        "num_attention_heads": _heads(family, width),
        "intermediate_size": sd["layer.0.mlp.up_proj.weight"].shape[0],
        "use_gated_mlp": gated,
        "hidden_act": "silu" if gated else "gelu",
        "query_bias": "layer.0.attention.q_proj.bias" in sd,
        "value_bias": "layer.0.attention.v_proj.bias" in sd,
        "key_bias": "layer.0.attention.k_proj.bias" in sd,
        "num_register_tokens": registers.shape[1] if registers is not None else 0,
    }


def _dinov2_shapes(family: str, sd: dict) -> dict:
    """DINOv2, with or without registers."""
    width, proj = sd["embeddings.cls_token"].shape[-1], sd["embeddings.patch_embeddings.projection.weight"]
    swiglu = "encoder.layer.0.mlp.weights_in.weight" in sd
    hidden = sd["encoder.layer.0.mlp." + ("weights_out" if swiglu else "fc2") + ".weight"].shape[1]
    ratio = (hidden + 0.5) / width if not swiglu else _swiglu_ratio(width, hidden)  # int(width * ratio) == hidden
    cfg = {
        "hidden_size": width,
        "patch_size": proj.shape[-1],
        "num_hidden_layers": _depth(sd, "encoder.layer."),
        "num_attention_heads": _heads(family, width),
        "mlp_ratio": ratio,
        "use_swiglu_ffn": swiglu,
        "image_size": math.isqrt(sd["embeddings.position_embeddings"].shape[1] - 1) * proj.shape[-1],
        "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in sd,
    }
    if family.endswith("registers"):
        cfg["num_register_tokens"] = sd["embeddings.register_tokens"].shape[1]
    return cfg


def _swiglu_ratio(width: int, hidden: int) -> float:
    """The mlp_ratio whose Dinov2SwiGLUFFN has ``hidden`` units (4 for ViT-g: 1536 * 4 -> 4096)."""
    for ratio in (4, 4.0, hidden * 3 / 2 / width):
        if _dinov2_hidden(width, ratio, True) == 2 * hidden:
            return ratio
    raise CheckpointError(f"a DINOv2 SwiGLU of width {width} cannot have {hidden} hidden units")


def input_mean_std(family: str, pre: dict | None) -> tuple[tuple | None, tuple | None, str]:
    """(mean, std, where they come from): ``preprocessor_config.json``, else the model type's published values."""
    if pre is not None and pre.get("do_normalize", True) is False:
        return None, None, "preprocessor_config.json (do_normalize false: [0, 1] pixels)"
    if pre is not None and "image_mean" in pre and "image_std" in pre:
        return tuple(pre["image_mean"]), tuple(pre["image_std"]), "preprocessor_config.json"
    mean, std = MEAN_STD[family]
    return mean, std, f"{LABELS[family]}'s published values (no preprocessor_config.json)"
