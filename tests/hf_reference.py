"""Tiny Hugging Face snapshots written by transformers itself (random weights), and transformers' own forward.

Each case builds a transformers model from a small config (few layers, width 32), moves every weight
off its initial value (LayerNorm weights, LayerScale, biases included, so that a wrong norm, scale or
bias changes the features), and writes it with ``save_pretrained``: the names and shapes of the files
published on the Hub. ``reference(case, model, x)`` is the model's own ``pooler_output`` (CLIP's
projected image embedding with ``fc=True``) with ``interpolate_pos_encoding=True`` where the class has
it: transformers is the reference the teachers are checked against.
"""

from __future__ import annotations

import json
import os

import torch
import transformers as tf

TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=99)
VIS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)

# name -> (model class, config); DINOv2 stores the 518 px grid (37 x 37) as the released files do.
CASES = {
    "dinov2": (tf.Dinov2Model, lambda: tf.Dinov2Config(**DINO, image_size=518, patch_size=14)),
    "dinov2_swiglu": (
        tf.Dinov2Model,  # ViT-g's SwiGLU feed-forward (mlp.weights_in / weights_out)
        lambda: tf.Dinov2Config(**DINO, image_size=518, patch_size=14, use_swiglu_ffn=True),
    ),
    "dinov2_registers": (
        tf.Dinov2WithRegistersModel,
        lambda: tf.Dinov2WithRegistersConfig(**DINO, image_size=518, patch_size=14, num_register_tokens=4),
    ),
    "dinov3": (
        tf.DINOv3ViTModel,
        lambda: tf.DINOv3ViTConfig(**DINO, intermediate_size=48, patch_size=16, num_register_tokens=4),
    ),
    "dinov3_gated": (
        tf.DINOv3ViTModel,  # S+, H+ and 7B: gated MLP (gate_proj, up_proj, down_proj) with SiLU
        lambda: tf.DINOv3ViTConfig(
            **DINO, intermediate_size=48, patch_size=16, num_register_tokens=4, use_gated_mlp=True, hidden_act="silu"
        ),
    ),
    "dinov3_convnext": (
        tf.DINOv3ConvNextModel,
        lambda: tf.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1]),
    ),
    "clip": (
        tf.CLIPModel,  # OpenAI's layout: quick-GELU (the class default)
        lambda: tf.CLIPConfig(text_config=TEXT, vision_config=dict(**VIS, patch_size=16), projection_dim=24),
    ),
    "clip_laion": (
        tf.CLIPModel,  # LAION's: GELU, patch 14
        lambda: tf.CLIPConfig(
            text_config=TEXT, vision_config=dict(**VIS, patch_size=14, hidden_act="gelu"), projection_dim=24
        ),
    ),
    "clip_vision": (tf.CLIPVisionModel, lambda: tf.CLIPVisionConfig(**VIS, patch_size=32)),
    "clip_projection": (
        tf.CLIPVisionModelWithProjection,
        lambda: tf.CLIPVisionConfig(**VIS, patch_size=16, projection_dim=24),
    ),
    "siglip": (tf.SiglipModel, lambda: tf.SiglipConfig(text_config=TEXT, vision_config=dict(**VIS, patch_size=16))),
    "siglip_vision": (tf.SiglipVisionModel, lambda: tf.SiglipVisionConfig(**VIS, patch_size=14)),
    "vit": (tf.ViTModel, lambda: tf.ViTConfig(**VIS, patch_size=16, layer_norm_eps=1e-6)),
}
# the other size each case is checked at (a multiple of its patch; 224 is the first)
OTHER_SIZE = {
    "dinov2": 98,
    "dinov2_swiglu": 168,
    "dinov2_registers": 126,
    "dinov3": 160,
    "dinov3_gated": 96,
    "dinov3_convnext": 160,
    "clip": 128,
    "clip_laion": 266,
    "clip_vision": 160,
    "clip_projection": 320,
    "siglip": 112,
    "siglip_vision": 140,
    "vit": 176,
}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value by N(0, 0.05^2) noise; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def build(case: str, seed: int = 0) -> torch.nn.Module:
    cls, config = CASES[case]
    torch.manual_seed(seed)
    return randomized(cls(config()), seed)


def write_snapshot(model: torch.nn.Module, folder: str, preprocessor: dict | None = None, **save) -> str:
    """``model.save_pretrained(folder)`` (the Hub's file names), plus a ``preprocessor_config.json``."""
    model.save_pretrained(folder, **save)
    if preprocessor is not None:
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f)
    return folder


def vision(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower of a whole CLIP / SigLIP model (itself otherwise)."""
    return getattr(model, "vision_model", model)


@torch.no_grad()
def outputs(case: str, model: torch.nn.Module, x: torch.Tensor):
    """transformers' forward on normalised pixels ``x`` (any size its patch divides)."""
    interp = {"interpolate_pos_encoding": True} if case.startswith(("clip", "siglip", "vit")) else {}
    return vision(model)(pixel_values=x, **interp)


@torch.no_grad()
def reference(case: str, model: torch.nn.Module, x: torch.Tensor, fc: bool = False) -> torch.Tensor:
    """The pooled output transformers computes: ``pooler_output`` (ViTModel: its final-norm class token,
    the pooler being a tanh layer DINO's files do not carry); ``fc``: CLIP's projected image embedding."""
    if fc:
        if isinstance(model, tf.CLIPVisionModelWithProjection):
            return model(pixel_values=x, interpolate_pos_encoding=True).image_embeds
        return model.get_image_features(pixel_values=x, interpolate_pos_encoding=True).pooler_output
    out = outputs(case, model, x)
    return out.last_hidden_state[:, 0] if case == "vit" else out.pooler_output


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-sample relative difference ||a - b|| / ||b|| over the batch."""
    a, b = a.detach(), b.detach()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())
