"""Hugging Face vision backbones on timm's modules, computing what transformers' own forward computes.

The networks behind :mod:`models.hf_layouts`: the file's weights in timm's names, the numerics of the
transformers class they come from (read from transformers' ``modeling_*.py``):

- **position embedding at another input size**: every absolute-position model here resamples the
  stored M x M grid bicubically to ``size = (h, w)`` (no ``+0.1`` offset, unlike the DINO/DINOv2 hub
  code), without antialias (``Dinov2Model``, ``CLIPVisionModel``, ``SiglipVisionModel``, ``ViTModel``
  with ``interpolate_pos_encoding=True``) or with it (``Dinov2WithRegistersModel``): ``pos``;
- DINOv3 has RoPE on the patch tokens with periods computed from ``rope_theta`` (never stored):
  :class:`HFRopeViT`, the project's DINOv3 network (:class:`models.vit.RopeViT`) with those periods;
- token order [class, registers, patches]; CLIP normalises the embeddings first (``pre_layrnorm``) and
  has no patch bias; SigLIP has no class token and pools with its attention head (``head``);
- the pooled output (``pooler_output``): the final-norm class token (DINOv2, DINOv3, CLIP's
  ``post_layernorm`` class token), SigLIP's attention-pooling head, DINOv3 ConvNeXt's LayerNorm of the
  spatial mean.

Every network also gives its final-norm patch tokens (class token and registers left out) as a grid,
``patch_tokens(x) -> (B, h, w, D)``, the targets a dense objective regresses: :func:`patch_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import GELUTanh, QuickGELU
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.errors import UserError
from models.io import CheckpointError, load_strict
from models.vit import POOLS, RopeViT, ViTSpec, check_patch_multiple, materialise, timm_vit_args

ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": GELUTanh, "silu": nn.SiLU}


@dataclass(frozen=True)
class HFSpec:
    """A Hugging Face vision backbone as its config (or its tensors' shapes) describes it."""

    model_type: str  # dinov2 | dinov2_with_registers | dinov3_vit | clip | siglip | vit | dinov3_convnext
    width: int
    depth: int
    heads: int = 0
    patch: int = 0
    grid: int = 0  # the stored position-embedding grid (M x M); 0 for RoPE and ConvNeXt
    hidden: int = 0  # FFN hidden width (the packed gate+up width for DINOv2's SwiGLU)
    ffn: str = "mlp"  # mlp | swiglu_packed (DINOv2 ViT-g) | swiglu (DINOv3 gated MLP)
    act: str = "gelu"  # gelu | quick_gelu | gelu_tanh | silu
    eps: float = 1e-6
    class_token: bool = True
    n_reg: int = 0
    layerscale: bool = False
    pre_norm: bool = False  # CLIP's pre_layrnorm (and no patch-embedding bias)
    pooled: str = "cls"  # pooler_output: cls | head (SigLIP's attention pool) | mean (ConvNeXt) | none (no head)
    pos: str = "size"  # size | antialias | rope | none
    qkv_bias: bool = True
    rope_theta: float = 100.0
    dims: tuple[int, ...] = field(default=())  # ConvNeXt stage widths
    depths: tuple[int, ...] = field(default=())  # ConvNeXt stage depths

    @property
    def name(self) -> str:
        """``hf_dinov2_vit_s14``, ``hf_clip_vit_l14``, ``hf_siglip_vit_so400m14``, ``hf_dinov3_convnext_tiny``..."""
        if self.model_type == "dinov3_convnext":
            return "hf_dinov3_convnext_" + CONVNEXT_SIZES.get((self.dims, self.depths), f"w{self.dims[-1]}")
        base = SIZE_TAGS.get(self.width)
        plus = self.ffn == "swiglu" and self.width != 4096  # DINOv3's gated S+ and H+ (its 7B is gated too)
        tag = (base or f"w{self.width}") + ("plus" if plus else "") + ("" if base else "_p")
        reg = f"_reg{self.n_reg}" if self.n_reg and self.model_type != "dinov3_vit" else ""
        depth = "" if STANDARD_DEPTH.get(self.width) == self.depth else f"_depth{self.depth}"
        family = {"vit": "", "dinov2_with_registers": "dinov2_", "dinov3_vit": "dinov3_"}.get(
            self.model_type, f"{self.model_type}_"
        )
        return f"hf_{family}vit_{tag}{self.patch}{reg}{depth}"


SIZE_TAGS = {192: "t", 384: "s", 768: "b", 1024: "l", 1152: "so400m", 1280: "h", 1536: "g", 1664: "bigG", 4096: "7b"}
STANDARD_DEPTH = {192: 12, 384: 12, 768: 12, 1024: 24, 1152: 27, 1280: 32, 1536: 40, 1664: 48, 4096: 40}
CONVNEXT_SIZES = {
    ((96, 192, 384, 768), (3, 3, 9, 3)): "tiny",
    ((96, 192, 384, 768), (3, 3, 27, 3)): "small",
    ((128, 256, 512, 1024), (3, 3, 27, 3)): "base",
    ((192, 384, 768, 1536), (3, 3, 27, 3)): "large",
}


def resample_grid(pos: torch.Tensor, m: int, h: int, w: int, antialias: bool) -> torch.Tensor:
    """(1, M*M, D) stored grid -> (1, h*w, D) as transformers resamples it: bicubic to ``size=(h, w)``, in float32."""
    if (h, w) == (m, m):
        return pos
    grid = pos.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)


def _pool(tokens: torch.Tensor, n_prefix: int, pool: str) -> torch.Tensor:
    """(B, N, D) final-norm tokens -> (B, D) class token, (B, D) patch mean, or (B, 2D) both."""
    avg = tokens[:, n_prefix:].mean(dim=1)
    if pool == "avg":
        return avg
    cls = tokens[:, 0]
    return cls if pool == "cls" else torch.cat([cls, avg], dim=-1)


class HFViT(VisionTransformer):
    """timm's ViT computing ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel``,
    ``SiglipVisionModel`` or ``ViTModel``.

    forward: normalised (B, 3, H, W), H and W multiples of the patch -> (B, feat_dim): the pooled output
    (``pool='cls'`` or ``'head'``), the mean of the final-norm patch tokens (``avg``) or both (``cls+avg``).
    State dict: timm's names, with the stored ``pos_embed`` (1, [1 +] M*M, D) kept as published.
    """

    def __init__(self, spec: HFSpec, pool: str) -> None:
        super().__init__(
            **timm_vit_args(spec, ACTIVATIONS[spec.act]),
            class_token=spec.class_token,
            pre_norm=spec.pre_norm,  # CLIP: LayerNorm before the blocks, no patch bias
            global_pool="map" if spec.pooled == "head" else "token" if spec.class_token else "avg",
            fc_norm=False,  # the final norm on every token (timm would move it after an 'avg' pool)
        )
        n_pos = int(spec.class_token) + spec.grid**2
        self.pos_embed = nn.Parameter(torch.empty(1, n_pos, spec.width))
        self.spec, self.pool_mode, self.patch = spec, pool, spec.patch
        self.feat_dim = spec.width * (2 if pool == "cls+avg" else 1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, D) -> (B, [1 +] n_reg + h*w, D): class token, position, then registers."""
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        n_cls = int(self.spec.class_token)
        grid = resample_grid(self.pos_embed[:, n_cls:], self.spec.grid, h, w, self.spec.pos == "antialias")
        if n_cls:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
            grid = torch.cat([self.pos_embed[:, :1], grid], dim=1)
        x = x + grid
        if self.reg_token is not None:  # DINOv2 with registers: they carry no position embedding
            x = torch.cat([x[:, :1], self.reg_token.expand(b, -1, -1), x[:, 1:]], dim=1)
        return self.pos_drop(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> final-norm tokens (B, [1 +] n_reg + h*w, D)."""
        check_patch_multiple(x.shape[-2], x.shape[-1], self.patch)
        return self.forward_features(x)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> final-norm patch tokens (B, h, w, D), class token and registers left out."""
        t = self.tokens(x)[:, self.num_prefix_tokens :]
        return t.reshape(x.shape[0], x.shape[-2] // self.patch, x.shape[-1] // self.patch, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        if self.pool_mode == "head":
            return self.attn_pool(t)
        return _pool(t, self.num_prefix_tokens, self.pool_mode)


class HFRopeViT(RopeViT):
    """``DINOv3ViTModel``: the project's DINOv3 network with RoPE periods ``rope_theta ** (4 i / head_dim)``
    computed as transformers computes them (float32, never read from the file)."""

    def __init__(self, spec: ViTSpec, pool: str, rope_theta: float) -> None:
        super().__init__(spec, pool)
        self.rope_theta = rope_theta

    def set_hf_periods(self) -> None:
        """transformers' ``inv_freq = 1 / theta ** arange(0, 1, 4 / head_dim)``; timm divides by periods."""
        head_dim = self.spec.width // self.spec.heads
        inv_freq = 1 / self.rope_theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)
        self.set_rope_periods(1 / inv_freq)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> final-norm patch tokens (B, h, w, D), class and storage tokens left out."""
        check_patch_multiple(x.shape[-2], x.shape[-1], self.patch)
        t = self.forward_features(x)[:, self.num_prefix_tokens :]
        return t.reshape(x.shape[0], x.shape[-2] // self.patch, x.shape[-1] // self.patch, -1)


class HFConvNeXt(ConvNeXt):
    """``DINOv3ConvNextModel``: timm's ConvNeXt; pooled output = LayerNorm of the last stage's spatial mean.

    forward: normalised (B, 3, H, W) -> (B, dims[-1]). ``patch_tokens``: the same LayerNorm on every
    position of the last stage (transformers' ``last_hidden_state[:, 1:]``), (B, H/32, W/32, D).
    """

    def __init__(self, spec: HFSpec) -> None:
        super().__init__(depths=spec.depths, dims=spec.dims, ls_init_value=1.0, num_classes=0, norm_eps=spec.eps)
        self.spec, self.pool_mode, self.patch = spec, None, None
        self.feat_dim = spec.dims[-1]

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.forward_features(x).permute(0, 2, 3, 1)  # (B, h, w, D)
        return F.layer_norm(fmap, fmap.shape[-1:], self.head.norm.weight, self.head.norm.bias, self.head.norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)


def dinov3_vit_spec(spec: HFSpec) -> ViTSpec:
    """The project's DINOv3 ViT description for an HF DINOv3 config."""
    return ViTSpec(
        family="dinov3",
        width=spec.width,
        depth=spec.depth,
        heads=spec.heads,
        patch=spec.patch,
        grid=0,
        hidden=spec.hidden,
        ffn=spec.ffn,
        n_reg=spec.n_reg,
        layerscale=True,
        qkv_bias=spec.qkv_bias,
        eps=spec.eps,
        pos="rope",
    )


def check_pool(spec: HFSpec, pool: str, path: str) -> str:
    """The pooling to build for ``--teacher_pool pool`` (``auto``: the model's own pooled output)."""
    if spec.model_type == "dinov3_convnext":
        if pool != "auto":
            raise UserError(
                f"--teacher_pool {pool} applies to ViT teachers; '{path}' is a DINOv3 ConvNeXt whose feature is its "
                "own pooled output (LayerNorm of the mean): drop --teacher_pool"
            )
        return "mean"
    if pool == "auto":
        if spec.pooled == "none":
            raise UserError(
                f"'{path}' is a SigLIP tower without its attention-pooling head (vision_use_head false), so it has no "
                "pooled output: pass --teacher_pool avg (the mean of its patch tokens)"
            )
        return spec.pooled
    if pool not in POOLS:
        raise UserError(f"--teacher_pool {pool!r}: choose auto, {', '.join(POOLS)}")
    if not spec.class_token and pool != "avg":
        raise UserError(
            f"--teacher_pool {pool}: '{path}' is a SigLIP tower without a class token; use auto (its attention-pooling "
            "head) or avg (the mean of its patch tokens)"
        )
    return pool


def build_hf_network(spec: HFSpec, pool: str) -> nn.Module:
    """The network for ``spec`` on the meta device (load the file with ``assign=True``, then :func:`finish`)."""
    with torch.device("meta"):
        if spec.model_type == "dinov3_convnext":
            return HFConvNeXt(spec)
        if spec.model_type == "dinov3_vit":
            return HFRopeViT(dinov3_vit_spec(spec), pool, spec.rope_theta)
        return HFViT(spec, pool)


def finish(net: nn.Module) -> nn.Module:
    """After the ``assign=True`` load: computed buffers on the CPU, DINOv3's periods as transformers has them."""
    materialise(net)
    if isinstance(net, HFRopeViT):
        net.set_hf_periods()
    return net


def load_hf_network(hf, arch: str | None, path: str, pool: str) -> tuple[nn.Module, str]:
    """The network of a converted Hugging Face checkpoint (:class:`models.hf_layouts.HFConverted`), its weights
    loaded strictly, at the pooling asked for; (network, its name)."""
    spec = hf.spec
    if arch and arch != spec.name:
        raise CheckpointError(
            f"teacher '{path}' holds a {hf.label} {spec.name} (a Hugging Face snapshot), but --arch_teacher is {arch}; "
            "leave --arch_teacher unset (config.json says what it holds)"
        )
    net = build_hf_network(spec, check_pool(spec, pool, path))
    load_strict(net, hf.backbone, path, f"teacher {spec.name} ({hf.label})", assign=True)
    return finish(net), spec.name


@torch.no_grad()
def patch_tokens(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Final-norm patch tokens (B, h, w, D), float32, of a frozen teacher for images in [0, 1], (B, 3, H, W).

    Works for every Hugging Face teacher here and for the hub ViTs (:mod:`models.vit`): the network's
    own normalisation is applied first; class token and registers / storage tokens are left out.
    """
    encoder = teacher.encoder if hasattr(teacher, "encoder") else teacher
    net, x = encoder.backbone, encoder.normalize(images)
    if hasattr(net, "patch_tokens"):
        return net.patch_tokens(x).float()
    if hasattr(net, "forward_features") and hasattr(net, "num_prefix_tokens") and hasattr(net, "patch"):
        check_patch_multiple(x.shape[-2], x.shape[-1], net.patch)
        t = net.forward_features(x)[:, net.num_prefix_tokens :]
        return t.reshape(x.shape[0], x.shape[-2] // net.patch, x.shape[-1] // net.patch, -1).float()
    raise UserError(f"teacher {getattr(teacher, 'arch', type(net).__name__)} has no patch tokens (not a ViT)")
