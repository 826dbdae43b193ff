"""Vision-transformer teachers on timm's modules, computing what each publisher's own code computes.

timm builds the blocks (attention on PyTorch's fused ``scaled_dot_product_attention``, so bf16 autocast
runs the fused kernels); this module sets the few numerics in which a publisher differs from timm's
defaults, all taken from the publishers' code:

- **position embedding at another input size** (``pos``): DINO (``vision_transformer.py``) and DINOv2
  without registers (``dinov2/models/vision_transformer.py``, hub defaults) resample the stored M x M
  grid bicubically with ``scale_factor = (n + 0.1) / M`` and no antialias (``offset``); DINOv2's
  ``_reg`` hub models use ``size = (h, w)`` with antialias (``antialias``); MoCo v3 (``vits.py``) uses
  a fixed 2-D sin-cos embedding, which its code builds for the grid of the image size (``sincos``);
  DINOv3 has no absolute embedding but RoPE (``rope``), with the periods stored in the file;
- registers (DINOv2) join after the position embedding is added, storage tokens (DINOv3) before RoPE,
  which skips them; LayerNorm eps 1e-6 (DINO, DINOv2, MoCo v3) or 1e-5 (DINOv3's ``layernormbf16``);
- the feature: the final-norm class token (every publisher's evaluation), or the mean of the final-norm
  patch tokens, or both concatenated (DINOv2's linear evaluation): ``pool``.

Inputs must be a multiple of the patch size: the publishers' patch embedding would silently drop the
remainder (DINOv3) or fail an assert (DINOv2), so it is refused with a sentence instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, Mlp, SwiGLUPacked
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.errors import UserError

POOLS = ("cls", "avg", "cls+avg")
SIZE_TAGS = {192: "t", 384: "s", 768: "b", 1024: "l", 1280: "h", 1536: "g", 4096: "7b"}
STANDARD_DEPTH = {192: 12, 384: 12, 768: 12, 1024: 24, 1280: 32, 1536: 40, 4096: 40}


@dataclass(frozen=True)
class ViTSpec:
    """What a ViT checkpoint's shapes and its publisher's constructors say about the network."""

    family: str  # dino | dinov2 | dinov3 | mocov3
    width: int
    depth: int
    heads: int  # not in the shapes: the publisher's constructor for this width
    patch: int
    grid: int  # the stored position-embedding grid (M x M); 0 for RoPE
    hidden: int  # FFN hidden width (the packed w12 width for DINOv2's SwiGLU)
    ffn: str = "mlp"  # mlp | swiglu_packed (DINOv2 ViT-g: w12, w3) | swiglu (DINOv3: w1, w2, w3)
    n_reg: int = 0  # registers (DINOv2 _reg4) or storage tokens (DINOv3)
    layerscale: bool = False
    qkv_bias: bool = True
    eps: float = 1e-6
    pos: str = "offset"  # offset | antialias | sincos | rope

    @property
    def name(self) -> str:
        """``vit_s14_reg4``, ``vit_b16``, ``vit_splus16``... (depth appended when not the usual one)."""
        tag = SIZE_TAGS.get(self.width, f"w{self.width}") + ("plus" if self.ffn == "swiglu" else "")
        name = f"vit_{tag}{self.patch}" + (f"_reg{self.n_reg}" if self.n_reg and self.family == "dinov2" else "")
        return name + ("" if STANDARD_DEPTH.get(self.width) == self.depth else f"_depth{self.depth}")


# ---------------------------------------------------------------- position embeddings
def mocov3_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos embedding for an h x w grid, class slot first: (1, 1 + h*w, dim).

    As ``build_2d_sincos_position_embedding`` in moco-v3/vits.py: the first half encodes the token's row,
    the second its column (its meshgrid names them the other way round; on its square grids the result
    is this), each as [sin, cos] of ``pos * temperature ** -(i / (dim / 4))``; the class slot is zero.
    """
    if dim % 4:
        raise UserError(f"a 2-D sin-cos position embedding needs a width divisible by 4, not {dim}")
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_r = rows.flatten()[:, None] * omega[None]
    out_c = cols.flatten()[:, None] * omega[None]
    grid = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), grid])[None]


def resize_pos_embed(pos: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    """The stored (1, 1 + M*M, D) embedding for an h x w patch grid, as the publisher resizes it.

    ``offset``: bicubic, ``scale_factor = ((h + 0.1) / M, (w + 0.1) / M)``, no antialias (DINO, DINOv2);
    the scale factor, not the output size, sets the sampling positions, so this differs from a
    size-based resize. ``antialias``: bicubic to ``size = (h, w)`` with antialias (DINOv2 ``_reg``).
    ``sincos``: MoCo v3's fixed embedding rebuilt for the grid. The stored grid itself is returned as is.
    """
    m = math.isqrt(pos.shape[1] - 1)
    if (h, w) == (m, m):
        return pos
    if mode == "sincos":
        return mocov3_sincos(h, w, pos.shape[-1]).to(pos.device)
    cls, grid = pos[:, :1].float(), pos[:, 1:].float()
    grid = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    if mode == "offset":
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
    elif mode == "antialias":
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    else:
        raise ValueError(f"unknown position-embedding mode {mode!r}")
    assert grid.shape[-2:] == (h, w), grid.shape  # the +0.1 guards the floor of M * scale
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def check_patch_multiple(height: int, width: int, patch: int, what: str = "an input") -> None:
    """A UserError unless ``patch`` divides both sides (no silent crop of the image's border)."""
    if height % patch or width % patch:
        near = max(patch, round(height / patch) * patch)
        raise UserError(
            f"{what} of {height}x{width} px is not a multiple of the ViT teacher's patch size {patch}: the "
            f"patch embedding would drop the border; choose a multiple of {patch} (e.g. {near})"
        )


def pool_tokens(tokens: torch.Tensor, n_prefix: int, pool: str) -> torch.Tensor:
    """(B, N, D) final-norm tokens -> (B, D) class token, (B, D) patch mean, or (B, 2D) both."""
    cls, avg = tokens[:, 0], tokens[:, n_prefix:].mean(dim=1)
    return {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], dim=-1)}[pool]


# ---------------------------------------------------------------- networks
def timm_vit_args(spec, act_layer: type[nn.Module]) -> dict:
    """timm ``VisionTransformer`` arguments shared by the published ViT layouts (hub files and Hugging Face
    snapshots): sizes from ``spec`` (grid, patch, width, depth, heads, hidden, qkv_bias, layerscale, n_reg,
    ffn, eps), no stored position embedding (each class sets the publisher's), no classifier, no init."""
    swiglu = spec.ffn == "swiglu_packed"
    return dict(
        img_size=spec.grid * spec.patch,
        patch_size=spec.patch,
        embed_dim=spec.width,
        depth=spec.depth,
        num_heads=spec.heads,
        mlp_ratio=(spec.hidden + 0.5) / spec.width,  # timm sizes the FFN as int(width * ratio)
        qkv_bias=spec.qkv_bias,
        init_values=1.0 if spec.layerscale else None,  # the file's values replace it
        reg_tokens=spec.n_reg,
        pos_embed="none",  # the published embedding is set by the class
        dynamic_img_size=True,
        num_classes=0,
        weight_init="skip",
        norm_layer=partial(nn.LayerNorm, eps=spec.eps),
        act_layer=nn.SiLU if swiglu else act_layer,
        mlp_layer=SwiGLUPacked if swiglu else Mlp,
    )


class AbsPosViT(VisionTransformer):
    """timm's ViT with the publisher's absolute position embedding (DINO, DINOv2, MoCo v3).

    forward: normalised (B, 3, H, W), H and W multiples of the patch -> (B, feat_dim). The state dict
    has timm's names with the stored ``pos_embed`` (1, 1 + M*M, D) kept as published.
    """

    def __init__(self, spec: ViTSpec, pool: str = "cls") -> None:
        super().__init__(**timm_vit_args(spec, nn.GELU), global_pool="token")
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + spec.grid**2, spec.width))
        self.spec, self.pool_mode = spec, pool
        self.patch = spec.patch
        self.feat_dim = spec.width * (2 if pool == "cls+avg" else 1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, D) -> (B, 1 + n_reg + h*w, D): class token, position, then registers."""
        b, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
        x = x + resize_pos_embed(self.pos_embed, h, w, self.spec.pos)
        if self.reg_token is not None:  # DINOv2: registers carry no position embedding
            x = torch.cat([x[:, :1], self.reg_token.expand(b, -1, -1), x[:, 1:]], dim=1)
        return self.pos_drop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_patch_multiple(x.shape[-2], x.shape[-1], self.patch)
        return pool_tokens(self.forward_features(x), self.num_prefix_tokens, self.pool_mode)


class RopeViT(Eva):
    """timm's DINOv3 port (Eva) set as DINOv3's hub constructors set it, with the file's RoPE periods.

    DINOv3 order: [class, storage tokens, patches]; RoPE on the patch tokens only; the key bias is
    masked to zero (``bias_mask``), so timm's fixed zero ``k_bias`` is exact. forward as
    :class:`AbsPosViT`.
    """

    def __init__(self, spec: ViTSpec, pool: str = "cls") -> None:
        super().__init__(
            img_size=16 * spec.patch,
            patch_size=spec.patch,
            embed_dim=spec.width,
            depth=spec.depth,
            num_heads=spec.heads,
            qkv_bias=spec.qkv_bias,
            mlp_ratio=(spec.hidden + 0.5) / spec.width,
            swiglu_mlp=spec.ffn == "swiglu",
            swiglu_align_to=1,  # the file's hidden width as is (separate w1 / w2 weights)
            init_values=1e-5 if spec.layerscale else None,
            rope_type="dinov3",
            rope_temperature=100.0,  # replaced by the stored periods
            rope_rotate_half=True,
            use_rot_pos_emb=True,
            use_abs_pos_emb=False,
            num_reg_tokens=spec.n_reg,
            use_fc_norm=False,
            norm_layer=partial(LayerNorm, eps=spec.eps),
            dynamic_img_size=True,
            num_classes=0,
            global_pool="token",  # timm's DINOv3 default is 'avg'; DINOv3's feature is the class token
        )
        self.spec, self.pool_mode = spec, pool
        self.patch = spec.patch
        self.feat_dim = spec.width * (2 if pool == "cls+avg" else 1)

    def set_rope_periods(self, periods: torch.Tensor) -> None:
        """Use the file's periods (bf16-rounded in the released files; DINOv3's own code uses them as stored)."""
        if periods.shape != self.rope.periods.shape:
            raise UserError(
                f"the DINOv3 file's rope_embed.periods has shape {tuple(periods.shape)}, the network needs "
                f"{tuple(self.rope.periods.shape)} (head width / 4): its head count differs from DINOv3's"
            )
        self.rope.periods.copy_(periods.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_patch_multiple(x.shape[-2], x.shape[-1], self.patch)
        return pool_tokens(self.forward_features(x), self.num_prefix_tokens, self.pool_mode)


def build_vit(spec: ViTSpec, pool: str = "cls") -> nn.Module:
    """The network for ``spec``, on the meta device where timm allows it (no random init; load the file with
    ``assign=True``, then :func:`materialise`)."""
    if pool not in POOLS:
        raise UserError(f"--teacher_pool {pool!r}: choose one of {', '.join(POOLS)}")
    cls = RopeViT if spec.pos == "rope" else AbsPosViT
    try:
        with torch.device("meta"):
            return cls(spec, pool)
    except (RuntimeError, NotImplementedError):  # older timm reads values while building (1.0.20: .item())
        return cls(spec, pool)


@torch.no_grad()
def materialise(net: nn.Module) -> nn.Module:
    """After an ``assign=True`` load: the non-persistent buffers (RoPE periods, zero key bias) computed on
    the CPU as timm computes them; any tensor left on the meta device is a bug, not a silent zero."""
    for module in net.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
    for module in net.modules():  # timm's hook for computed buffers (EvaAttention.k_bias, RoPE periods)
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"ViT tensors left uninitialised after loading: {left[:5]}")
    return net
