"""Hugging Face transformers checkpoints: file names and config -> :class:`HFSpec` and timm's names.

A checkpoint here is what ``save_pretrained`` writes (``config.json`` + ``model.safetensors``, or shards)
or a bare weights file. Supported classes (``model_type`` in ``config.json``): ``Dinov2Model``
(``dinov2``), ``Dinov2WithRegistersModel`` (``dinov2_with_registers``), ``DINOv3ViTModel``
(``dinov3_vit``), ``DINOv3ConvNextModel`` (``dinov3_convnext``), ``CLIPModel`` / ``CLIPVisionModel`` /
``CLIPVisionModelWithProjection`` (``clip``, ``clip_vision_model``), ``SiglipModel`` /
``SiglipVisionModel`` (``siglip``, ``siglip_vision_model``; SigLIP 2 fixed-resolution checkpoints are
these classes) and ``ViTModel`` (``vit``). Names and shapes checked against transformers 5.24.0
(``models/<type>/modeling_<type>.py``, ``conversion_mapping.py``), whose ``save_pretrained`` writes the
published names (``attention.attention.query``, ``mlp.weights_in`` ...), not its in-memory ones
(``q_proj``, ``gate_proj`` ...); both are read, and DINOv3's earlier conversion names too
(``attention.query``, ``attention.proj``, ``patch_embeddings.proj``, ``layer_scale1.gamma``).

Three steps, all on plain dicts: the file's names are brought to one spelling (:func:`canonical`: the
published names, prefixes such as ``vision_model.`` or ``dinov2.`` removed); every tensor the backbone
needs is checked present and shaped (:func:`expected`) and the rest is either a known non-backbone
part (text tower, ``mask_token``, a classifier: dropped and listed) or an error; then the names become
timm's (:func:`to_timm`). Without ``config.json`` the network is read from the shapes and the model
type's published constructor (:mod:`models.hf_configs`; CLIP and plain ViT need their config: their
activation and LayerNorm eps are not in the shapes).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from models.hf_configs import FAMILIES, LABELS, REFUSED, input_mean_std, spec_from_config, spec_from_shapes
from models.hf_networks import HFSpec
from models.io import CheckpointError
from models.vit_layouts import to_timm as hub_vit_to_timm

log = logging.getLogger(__name__)


@dataclass
class HFCheckpoint:
    """What was read from disk: tensors under the file's names, ``config.json`` and
    ``preprocessor_config.json`` (None when absent), and the tensors deliberately left unread."""

    tensors: dict[str, torch.Tensor]
    config: dict | None = None
    preprocessor: dict | None = None
    path: str = ""
    unread: list[str] = field(default_factory=list)  # a whole CLIP/SigLIP file's text tower


@dataclass
class HFConverted:
    """A Hugging Face checkpoint mapped onto the network of ``spec`` (timm's names)."""

    spec: HFSpec
    backbone: dict[str, torch.Tensor]
    dropped: list[str]
    unknown: list[str]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    projection: dict[str, torch.Tensor] | None = None
    projection_name: str = ""

    @property
    def label(self) -> str:
        return LABELS[self.spec.model_type]


# ---------------------------------------------------------------- recognising a layout from its names
def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def family_of_keys(keys) -> str | None:
    """The family whose names ``keys`` carry (prefixes allowed), or None for anything else."""
    ks = set(keys)
    has = lambda *frags: any(all(f in k for f in frags) for k in ks)  # noqa: E731
    if has("embeddings.patch_embeddings.projection.weight"):
        if has("layernorm_before"):
            return "vit"
        return "dinov2_with_registers" if has("embeddings.register_tokens") else "dinov2"
    if has("embeddings.class_embedding") and has("patch_embedding.weight"):
        return "clip"
    if has("embeddings.patch_embedding.weight") and has("encoder.layers.0.self_attn"):
        return "siglip"
    top = lambda *starts: any(k.startswith(starts) for k in ks)  # noqa: E731  (DINOv3's blocks: no encoder.)
    if top("embeddings.cls_token") and top("layer.0.attention.", "model.layer.0.attention."):
        return "dinov3_vit"
    if has("stages.0.downsample_layers.0.weight") and has("layers.0.depthwise_conv"):
        return "dinov3_convnext"
    return None


def is_hf(raw: object) -> bool:
    """True for a read snapshot (:class:`HFCheckpoint`) or a tensor dict with a supported family's names."""
    if isinstance(raw, HFCheckpoint):
        return True
    return (
        isinstance(raw, dict) and bool(raw) and all(isinstance(k, str) for k in raw) and family_of_keys(raw) is not None
    )


# ---------------------------------------------------------------- one spelling per family
BASE_PREFIXES = ("dinov2.", "dinov2_with_registers.", "vit.", "dinov3_vit.")  # *ForImageClassification files
TOWER_DROPS = ("text_model.", "text_projection.", "logit_scale", "logit_bias")  # whole CLIP / SigLIP files

DINOV2_RENAMES = [  # transformers 5's in-memory names -> the published ones
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.down_proj\.", ".mlp.weights_out."),
]
VIT_RENAMES = [
    (r"^layers\.", "encoder.layer."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]
DINOV3_RENAMES = [  # the earlier conversion's names -> today's
    (r"^model\.layer\.", "layer."),
    (r"\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.proj\.", ".attention.o_proj."),
    (r"^embeddings\.patch_embeddings\.proj\.", "embeddings.patch_embeddings."),
    (r"\.layer_scale(\d)\.gamma$", r".layer_scale\1.lambda1"),
    (r"\.mlp\.fc1\.", ".mlp.up_proj."),
    (r"\.mlp\.fc2\.", ".mlp.down_proj."),
    (r"\.mlp\.w1\.", ".mlp.gate_proj."),
    (r"\.mlp\.w2\.", ".mlp.up_proj."),
    (r"\.mlp\.w3\.", ".mlp.down_proj."),
]


def _rename(sd: dict, renames: list) -> dict:
    out = {}
    for k, v in sd.items():
        for pattern, repl in renames:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _pack_swiglu(sd: dict) -> dict:
    """transformers 5's DINOv2 ``gate_proj`` / ``up_proj`` -> the published packed ``weights_in`` (gate first)."""
    out = dict(sd)
    for k in [k for k in sd if ".mlp.gate_proj." in k]:
        up = k.replace(".gate_proj.", ".up_proj.")
        if up in sd:
            out[k.replace(".gate_proj.", ".weights_in.")] = torch.cat([out.pop(k), out.pop(up)])
    return out


def canonical(family: str, sd: dict) -> tuple[dict, list[str], str]:
    """(the tensors under the published names with the prefix removed, keys dropped on purpose, that prefix)."""
    dropped = [k for k in sd if k.startswith(TOWER_DROPS) or k.endswith("position_ids")]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    found = ""
    for prefix in BASE_PREFIXES:  # a classification file: the backbone under its base-model prefix
        if any(k.startswith(prefix) for k in sd):
            dropped += [k for k in sd if k.startswith("classifier.")]
            sd = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items() if k not in dropped}
            found = prefix
    if family in ("clip", "siglip"):
        found = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
        sd = _strip(sd, "vision_model.")
    elif family.startswith("dinov2"):
        sd = _pack_swiglu(_rename(sd, DINOV2_RENAMES))
    elif family == "vit":
        sd = _rename(sd, VIT_RENAMES)
    elif family == "dinov3_vit":
        sd = _rename(sd, DINOV3_RENAMES)
    elif family == "dinov3_convnext":
        sd = _strip(sd, "model.")
    return sd, dropped, found


def _ln(name: str, d: int) -> dict:
    return {f"{name}.weight": (d,), f"{name}.bias": (d,)}


def _linear(name: str, out: int, inp: int, bias: bool = True) -> dict:
    return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}


def _vit_blocks(s: HFSpec, prefix: str, names: dict) -> dict:
    """The per-block tensors of an absolute-position ViT under ``names`` (the family's spelling)."""
    d, h, out = s.width, s.hidden, {}
    for i in range(s.depth):
        p = f"{prefix}{i}."
        out |= _ln(p + names["norm1"], d) | _ln(p + names["norm2"], d)
        for part in ("q", "k", "v"):
            out |= _linear(p + names[part], d, d, s.qkv_bias)
        out |= _linear(p + names["o"], d, d)
        if s.ffn == "swiglu_packed":
            out |= _linear(p + "mlp.weights_in", h, d) | _linear(p + "mlp.weights_out", d, h // 2)
        else:
            out |= _linear(p + names["fc1"], h, d) | _linear(p + names["fc2"], d, h)
        if s.layerscale:
            out |= {p + "layer_scale1.lambda1": (d,), p + "layer_scale2.lambda1": (d,)}
    return out


DINOV2_NAMES = dict(
    norm1="norm1",
    norm2="norm2",
    q="attention.attention.query",
    k="attention.attention.key",
    v="attention.attention.value",
    o="attention.output.dense",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
)
VIT_NAMES = dict(
    DINOV2_NAMES, norm1="layernorm_before", norm2="layernorm_after", fc1="intermediate.dense", fc2="output.dense"
)
CLIP_NAMES = dict(
    norm1="layer_norm1",
    norm2="layer_norm2",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
)


def expected(s: HFSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the backbone of ``s`` needs (published names, prefixes removed) -> its shape."""
    d, p, n = s.width, s.patch, s.grid * s.grid
    if s.model_type == "dinov3_convnext":
        return _convnext_expected(s)
    if s.model_type == "dinov3_vit":
        return _dinov3_expected(s)
    if s.model_type in ("clip", "siglip"):
        out = {"embeddings.patch_embedding.weight": (d, 3, p, p)}
        if s.model_type == "clip":
            out |= {"embeddings.class_embedding": (d,), "embeddings.position_embedding.weight": (n + 1, d)}
            out |= _ln("pre_layrnorm", d)
        else:
            out |= {"embeddings.patch_embedding.bias": (d,), "embeddings.position_embedding.weight": (n, d)}
        out |= _vit_blocks(s, "encoder.layers.", CLIP_NAMES) | _ln("post_layernorm", d)
        if s.pooled == "head":
            out |= {
                "head.probe": (1, 1, d),
                "head.attention.in_proj_weight": (3 * d, d),
                "head.attention.in_proj_bias": (3 * d,),
            }
            out |= _linear("head.attention.out_proj", d, d) | _ln("head.layernorm", d)
            out |= _linear("head.mlp.fc1", s.hidden, d) | _linear("head.mlp.fc2", d, s.hidden)
        return out
    out = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, n + 1, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
    }
    if s.n_reg:
        out["embeddings.register_tokens"] = (1, s.n_reg, d)
    names = VIT_NAMES if s.model_type == "vit" else DINOV2_NAMES
    return out | _vit_blocks(s, "encoder.layer.", names) | _ln("layernorm", d)


def _dinov3_expected(s: HFSpec) -> dict:
    d, h, p = s.width, s.hidden, s.patch
    out = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.patch_embeddings.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.bias": (d,),
    }
    if s.n_reg:
        out["embeddings.register_tokens"] = (1, s.n_reg, d)
    for i in range(s.depth):
        b = f"layer.{i}."
        out |= _ln(b + "norm1", d) | _ln(b + "norm2", d) | _linear(b + "attention.o_proj", d, d)
        out |= _linear(b + "attention.q_proj", d, d, s.qkv_bias) | _linear(b + "attention.v_proj", d, d, s.qkv_bias)
        out |= _linear(b + "attention.k_proj", d, d, False)
        out |= {b + "layer_scale1.lambda1": (d,), b + "layer_scale2.lambda1": (d,)}
        out |= _linear(b + "mlp.up_proj", h, d) | _linear(b + "mlp.down_proj", d, h)
        if s.ffn == "swiglu":
            out |= _linear(b + "mlp.gate_proj", h, d)
    return out | _ln("norm", d)


def _convnext_expected(s: HFSpec) -> dict:
    out = {}
    for i, (d, depth) in enumerate(zip(s.dims, s.depths, strict=True)):
        st = f"stages.{i}."
        if i == 0:
            out |= {st + "downsample_layers.0.weight": (d, 3, 4, 4), st + "downsample_layers.0.bias": (d,)}
            out |= _ln(st + "downsample_layers.1", d)
        else:
            out |= _ln(st + "downsample_layers.0", s.dims[i - 1])
            out |= {st + "downsample_layers.1.weight": (d, s.dims[i - 1], 2, 2), st + "downsample_layers.1.bias": (d,)}
        for j in range(depth):
            b = f"{st}layers.{j}."
            out |= {b + "depthwise_conv.weight": (d, 1, 7, 7), b + "depthwise_conv.bias": (d,), b + "gamma": (d,)}
            out |= _ln(b + "layer_norm", d) | _linear(b + "pointwise_conv1", 4 * d, d)
            out |= _linear(b + "pointwise_conv2", d, 4 * d)
    return out | _ln("layer_norm", s.dims[-1])


# Present in published files, not part of the backbone: dropped and listed.
OPTIONAL = ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias", "rope_embeddings.periods")


def check_tensors(s: HFSpec, sd: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    """(keys dropped on purpose, unknown keys), or a CheckpointError naming a missing or misshapen tensor.

    Names are shown as the file spells them: under ``prefix`` (``vision_model.``, ``dinov2.``) when it had one.
    """
    want = expected(s)
    name = lambda k: (
        prefix + k
        if k.split(".")[0] in ("embeddings", "encoder", "post_layernorm", "pre_layrnorm", "head", "layernorm")
        else k
    )  # noqa: E731
    missing = [name(k) for k in want if k not in sd]
    if missing:
        more = f" ... and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise CheckpointError(
            f"it lacks {len(missing)} tensor(s) the {LABELS[s.model_type]} backbone {s.name} needs: "
            f"{', '.join(missing[:6])}{more}; the download is incomplete or config.json belongs to another model"
        )
    bad = [f"{name(k)} {tuple(sd[k].shape)} (needs {v})" for k, v in want.items() if tuple(sd[k].shape) != v]
    if bad:
        raise CheckpointError(
            f"{len(bad)} of its tensor(s) do not have the shapes config.json gives: {', '.join(bad[:4])}; "
            "the weights and config.json come from different models"
        )
    rest = [k for k in sd if k not in want]
    empty_reg = lambda k: k == "embeddings.register_tokens" and sd[k].numel() == 0  # noqa: E731
    dropped = [k for k in rest if k in OPTIONAL or k == "visual_projection.weight" or empty_reg(k)]
    return [name(k) for k in dropped], [name(k) for k in rest if k not in dropped]


# ---------------------------------------------------------------- timm's names
def _fuse_qkv(out: dict, sd: dict, src: str, dst: str, names: dict) -> None:
    """Separate q/k/v projections (``names``) of block ``src`` -> timm's fused ``{dst}.attn.qkv``."""
    for param in ("weight", "bias"):
        parts = [sd.get(f"{src}{names[p]}.{param}") for p in ("q", "k", "v")]
        if parts[0] is not None:
            out[f"{dst}attn.qkv.{param}"] = torch.cat(parts)


def _abs_vit_to_timm(s: HFSpec, sd: dict) -> dict:
    """DINOv2 / ViT / CLIP / SigLIP published names -> :class:`models.hf_networks.HFViT`'s."""
    clip_like = s.model_type in ("clip", "siglip")
    names = CLIP_NAMES if clip_like else VIT_NAMES if s.model_type == "vit" else DINOV2_NAMES
    prefix = "encoder.layers." if clip_like else "encoder.layer."
    out = {}
    for i in range(s.depth):
        src, dst = f"{prefix}{i}.", f"blocks.{i}."
        _fuse_qkv(out, sd, src, dst, names)
        pairs = [
            (names["norm1"], "norm1"),
            (names["norm2"], "norm2"),
            (names["o"], "attn.proj"),
            (names["fc1"], "mlp.fc1"),
            (names["fc2"], "mlp.fc2"),
            ("mlp.weights_in", "mlp.fc1"),
            ("mlp.weights_out", "mlp.fc2"),
        ]
        for a, b in pairs:
            for param in ("weight", "bias"):
                if f"{src}{a}.{param}" in sd:
                    out[f"{dst}{b}.{param}"] = sd[f"{src}{a}.{param}"]
        if s.layerscale:
            out[dst + "ls1.gamma"], out[dst + "ls2.gamma"] = (
                sd[src + "layer_scale1.lambda1"],
                sd[src + "layer_scale2.lambda1"],
            )
    return out | (_clip_like_top(s, sd) if clip_like else _dinov2_top(sd))


def _dinov2_top(sd: dict) -> dict:
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in sd and sd["embeddings.register_tokens"].numel():
        out["reg_token"] = sd["embeddings.register_tokens"]
    return out


def _clip_like_top(s: HFSpec, sd: dict) -> dict:
    out = {
        "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
        "pos_embed": sd["embeddings.position_embedding.weight"][None],
        "norm.weight": sd["post_layernorm.weight"],
        "norm.bias": sd["post_layernorm.bias"],
    }
    if s.model_type == "clip":
        out["cls_token"] = sd["embeddings.class_embedding"].reshape(1, 1, -1)
        out["norm_pre.weight"], out["norm_pre.bias"] = sd["pre_layrnorm.weight"], sd["pre_layrnorm.bias"]
        return out
    out["patch_embed.proj.bias"] = sd["embeddings.patch_embedding.bias"]
    if s.pooled == "head":  # nn.MultiheadAttention's packed in_proj: query rows first, then key and value
        d = s.width
        w, b = sd["head.attention.in_proj_weight"], sd["head.attention.in_proj_bias"]
        out |= {
            "attn_pool.latent": sd["head.probe"],
            "attn_pool.q.weight": w[:d],
            "attn_pool.q.bias": b[:d],
            "attn_pool.kv.weight": w[d:],
            "attn_pool.kv.bias": b[d:],
        }
        for a, c in (
            ("attention.out_proj", "proj"),
            ("layernorm", "norm"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            out[f"attn_pool.{c}.weight"], out[f"attn_pool.{c}.bias"] = sd[f"head.{a}.weight"], sd[f"head.{a}.bias"]
    return out


def _dinov3_to_timm(s: HFSpec, sd: dict) -> dict:
    """DINOv3 HF names -> the publisher's hub names -> :class:`models.vit.RopeViT`'s (one mapping for both)."""
    hub = {
        "cls_token": sd["embeddings.cls_token"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    if s.n_reg:
        hub["storage_tokens"] = sd["embeddings.register_tokens"]
    biases = {}  # timm's q_bias / v_bias; its key bias is a fixed zero
    for i in range(s.depth):
        src, dst = f"layer.{i}.", f"blocks.{i}."
        q, k, v = (f"{src}attention.{p}_proj." for p in "qkv")
        hub[dst + "attn.qkv.weight"] = torch.cat([sd[q + "weight"], sd[k + "weight"], sd[v + "weight"]])
        if s.qkv_bias:
            biases[dst + "attn.q_bias"], biases[dst + "attn.v_bias"] = sd[q + "bias"], sd[v + "bias"]
        key_bias = sd.get(k + "bias")  # transformers' key_bias=False: absent; a config that keeps one must hold 0
        if key_bias is not None and not key_bias.is_meta and bool(key_bias.abs().max() > 0):
            raise CheckpointError(
                f"{k}bias is not zero; DINOv3 masks the key bias to zero and these networks keep it there"
            )
        mlp = (
            (("gate_proj", "w1"), ("up_proj", "w2"), ("down_proj", "w3"))
            if s.ffn == "swiglu"
            else (("up_proj", "fc1"), ("down_proj", "fc2"))
        )
        renames = [("norm1", "norm1"), ("norm2", "norm2"), ("attention.o_proj", "attn.proj")]
        for a, b in renames + [(f"mlp.{x}", f"mlp.{y}") for x, y in mlp]:
            hub[f"{dst}{b}.weight"], hub[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
        hub[dst + "ls1.gamma"], hub[dst + "ls2.gamma"] = (
            sd[src + "layer_scale1.lambda1"],
            sd[src + "layer_scale2.lambda1"],
        )
    out, _ = hub_vit_to_timm(hub, "dinov3")
    return out | biases


def _convnext_to_timm(s: HFSpec, sd: dict) -> dict:
    """DINOv3ConvNext names -> timm's ConvNeXt (stem, stages.i.downsample, blocks, head.norm)."""
    out = {"head.norm.weight": sd["layer_norm.weight"], "head.norm.bias": sd["layer_norm.bias"]}
    for k, v in sd.items():
        m = re.match(r"stages\.(\d+)\.(downsample_layers\.(\d)|layers\.(\d+))\.(.+)", k)
        if not m:
            continue
        stage, _, down, block, rest = m.groups()
        if down is not None:
            name = f"stem.{down}.{rest}" if stage == "0" else f"stages.{stage}.downsample.{down}.{rest}"
        else:
            for a, b in (
                ("depthwise_conv", "conv_dw"),
                ("layer_norm", "norm"),
                ("pointwise_conv1", "mlp.fc1"),
                ("pointwise_conv2", "mlp.fc2"),
            ):
                rest = rest.replace(a, b) if rest.startswith(a) else rest
            name = f"stages.{stage}.blocks.{block}.{rest}"
        out[name] = v
    return out


def to_timm(s: HFSpec, sd: dict) -> dict[str, torch.Tensor]:
    """Checked tensors under the published names -> the network's state dict."""
    if s.model_type == "dinov3_convnext":
        return _convnext_to_timm(s, sd)
    if s.model_type == "dinov3_vit":
        return _dinov3_to_timm(s, sd)
    return _abs_vit_to_timm(s, sd)


# ---------------------------------------------------------------- the whole conversion
def _family(ckpt: HFCheckpoint) -> str:
    """The family ``config.json`` names (checked against the tensors' names), or the names' own."""
    keys = list(ckpt.tensors) + ckpt.unread
    found = family_of_keys(keys)
    if ckpt.config is None:
        if found is None:
            raise CheckpointError("it holds no tensors of a supported Hugging Face model")
        return found
    mt = ckpt.config.get("model_type")
    if mt in REFUSED:
        raise CheckpointError(f"config.json says model_type '{mt}': {REFUSED[mt]}")
    if mt not in FAMILIES:
        raise CheckpointError(
            f"config.json says model_type {mt!r}, which is not a supported teacher; supported: "
            f"{', '.join(FAMILIES)} (DINOv2, DINOv3, CLIP, SigLIP, ViT)"
        )
    family = FAMILIES[mt]
    if found is not None and found != family:
        raise CheckpointError(
            f"config.json says model_type '{mt}' but the weights are a {LABELS[found]} model's; "
            "the folder mixes two models' files"
        )
    return family


def convert(raw: object) -> HFConverted:
    """A read snapshot or a bare tensor dict -> the network's weights, what was dropped, and preprocessing."""
    ckpt = raw if isinstance(raw, HFCheckpoint) else HFCheckpoint(dict(raw))
    family = _family(ckpt)
    sd, dropped, prefix = canonical(family, ckpt.tensors)
    try:
        spec = spec_from_config(family, ckpt.config) if ckpt.config else spec_from_shapes(family, sd)
    except KeyError as exc:  # a bare file without a tensor its shapes are read from
        raise CheckpointError(f"it lacks the tensor {exc} a {LABELS[family]} backbone needs") from exc
    more, unknown = check_tensors(spec, sd, prefix)
    if spec.model_type == "dinov3_vit":  # the key bias a config may still carry must be zero (timm keeps it at 0)
        more += [k for k in unknown if k.endswith("attention.k_proj.bias")]
        unknown = [k for k in unknown if not k.endswith("attention.k_proj.bias")]
    backbone = to_timm(spec, sd)
    mean, std, source = input_mean_std(family, ckpt.preprocessor)
    log.info(
        "%s: %s (%s), input mean/std %s from %s",
        ckpt.path or "weights",
        spec.name,
        LABELS[family],
        "none" if mean is None else f"{tuple(round(m, 4) for m in mean)}/{tuple(round(v, 4) for v in std)}",
        source,
    )
    projection = {"weight": sd["visual_projection.weight"]} if "visual_projection.weight" in sd else None
    return HFConverted(
        spec,
        backbone,
        dropped + ckpt.unread + more,
        unknown,
        mean,
        std,
        projection,
        "CLIP's visual_projection (the image embedding)" if projection else "",
    )
