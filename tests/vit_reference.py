"""ViT checkpoints in each publisher's exact key layout (random weights), and an independent plain-torch
forward written from each publisher's own code (not from timm, not from models/vit.py).

References read: facebookresearch/dino ``vision_transformer.py`` (``interpolate_pos_encoding``,
``Attention``, ``Block``), facebookresearch/dinov2 ``dinov2/models/vision_transformer.py`` and
``dinov2/layers/{attention,block,layer_scale,swiglu_ffn}.py`` (registers after the position embedding,
``interpolate_offset`` / ``interpolate_antialias``, ``SwiGLUFFN``), facebookresearch/dinov3
``dinov3/models/vision_transformer.py`` and ``dinov3/layers/{attention,rope_position_encoding}.py``
(storage tokens, ``LinearKMaskedBias``, ``rope_apply``), facebookresearch/moco-v3 ``vits.py``
(``build_2d_sincos_position_embedding``) and ``moco/builder.py`` (``_build_mlp``).

Weights are drawn so that the residual stream is small (about 1e-2): a LayerNorm eps of 1e-5 instead
of 1e-6 then changes the features by far more than the tests' tolerance, so a wrong eps fails.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ---------------------------------------------------------------- random weights in the published layouts
def _ln(sd: dict, name: str, d: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(d, generator=g)
    sd[f"{name}.bias"] = 0.002 * torch.randn(d, generator=g)


def _lin(sd: dict, name: str, out: int, inp: int, g: torch.Generator, std: float, bias: bool = True) -> None:
    sd[f"{name}.weight"] = std * torch.randn(out, inp, generator=g)
    if bias:
        sd[f"{name}.bias"] = 0.002 * torch.randn(out, generator=g)


def vit_weights(
    width: int = 384,
    depth: int = 2,
    patch: int = 8,
    grid: int | None = 4,
    layerscale: bool = False,
    ffn: str = "mlp",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Backbone tensors with timm-0.4/DINO names (``cls_token``, ``pos_embed``, ``blocks.i.*``, ``norm``).

    ``ffn``: ``mlp`` (fc1/fc2), ``w12`` (DINOv2's SwiGLU: w12/w3) or ``w123`` (DINOv3's SwiGLU: w1/w2/w3).
    ``grid=None``: no ``pos_embed`` (DINOv3).
    """
    g = torch.Generator().manual_seed(seed)
    d, h = width, 4 * width
    sd = {"cls_token": 0.002 * torch.randn(1, 1, d, generator=g)}
    if grid:
        sd["pos_embed"] = 0.002 * torch.randn(1, 1 + grid * grid, d, generator=g)
    sd["patch_embed.proj.weight"] = 0.002 * torch.randn(d, 3, patch, patch, generator=g)
    sd["patch_embed.proj.bias"] = 0.002 * torch.randn(d, generator=g)
    for i in range(depth):
        b = f"blocks.{i}"
        _ln(sd, f"{b}.norm1", d, g)
        _lin(sd, f"{b}.attn.qkv", 3 * d, d, g, std=0.1)
        _lin(sd, f"{b}.attn.proj", d, d, g, std=0.0005)
        if layerscale:
            sd[f"{b}.ls1.gamma"] = 1 + 0.3 * torch.randn(d, generator=g)
        _ln(sd, f"{b}.norm2", d, g)
        if ffn == "mlp":
            _lin(sd, f"{b}.mlp.fc1", h, d, g, std=0.1)
            _lin(sd, f"{b}.mlp.fc2", d, h, g, std=0.0005)
        elif ffn == "w12":
            _lin(sd, f"{b}.mlp.w12", 2 * h, d, g, std=0.1)
            _lin(sd, f"{b}.mlp.w3", d, h, g, std=0.0005)
        else:
            _lin(sd, f"{b}.mlp.w1", h, d, g, std=0.1)
            _lin(sd, f"{b}.mlp.w2", h, d, g, std=0.1)
            _lin(sd, f"{b}.mlp.w3", d, h, g, std=0.0005)
        if layerscale:
            sd[f"{b}.ls2.gamma"] = 1 + 0.3 * torch.randn(d, generator=g)
    _ln(sd, "norm", d, g)
    return sd


def dinov2_file(n_reg: int = 0, ffn: str = "mlp", patch: int = 14, grid: int = 4, seed: int = 0) -> dict:
    """``dinov2_vits14[_reg4]_pretrain.pth``: LayerScale, ``mask_token`` (1, D), ``register_tokens`` (1, 4, D)."""
    sd = vit_weights(patch=patch, grid=grid, layerscale=True, ffn=ffn, seed=seed)
    sd["mask_token"] = torch.zeros(1, 384)
    if n_reg:
        sd["register_tokens"] = 0.002 * torch.randn(1, n_reg, 384, generator=torch.Generator().manual_seed(seed + 1))
    return sd


def dinov3_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """RopePositionEmbedding._init_weights with ``base``, stored bf16-rounded as in the released files."""
    periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    return periods.to(torch.bfloat16).float()


def dinov3_file(ffn: str = "mlp", heads: int = 6, seed: int = 0) -> dict:
    """``dinov3_vits16_pretrain_lvd1689m-*.pth``: storage tokens, RoPE periods, masked key bias, LayerScale."""
    sd = vit_weights(patch=16, grid=None, layerscale=True, ffn=ffn, seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    sd["storage_tokens"] = 0.002 * torch.randn(1, 4, 384, generator=g)
    sd["mask_token"] = torch.zeros(1, 384)
    sd["rope_embed.periods"] = dinov3_periods(384 // heads)
    for key in [k for k in sd if k.endswith("attn.qkv.bias")]:
        sd[key] = 0.5 * torch.randn(3 * 384, generator=g)  # large q/v biases: dropping them would show
        mask = torch.ones(3 * 384)
        mask[384:768] = 0  # init_weights_vit: the key third is masked
        sd[key + "_mask"] = mask
    return sd


def mocov3_sincos_reference(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """moco-v3 vits.py build_2d_sincos_position_embedding, step by step, for a square grid."""
    h = w = grid
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]
    return torch.cat([torch.zeros([1, 1, dim]), pos_emb], dim=1)


def _bn(sd: dict, name: str, d: int, g: torch.Generator, affine: bool = True) -> None:
    if affine:
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(d, generator=g)
    sd[f"{name}.running_mean"] = 0.1 * torch.randn(d, generator=g)
    sd[f"{name}.running_var"] = 0.5 + torch.rand(d, generator=g)
    sd[f"{name}.num_batches_tracked"] = torch.tensor(100)


def mocov3_mlp(num_layers: int, inp: int, hidden: int, out: int, g: torch.Generator) -> dict:
    """moco/builder.py _build_mlp: Linear(no bias) BN ReLU ... Linear BN(affine=False)."""
    sd = {}
    for layer in range(num_layers):
        i = 3 * layer
        d1, d2 = inp if layer == 0 else hidden, out if layer == num_layers - 1 else hidden
        sd[f"{i}.weight"] = torch.randn(d2, d1, generator=g) / math.sqrt(d1)
        _bn(sd, str(i + 1), d2, g, affine=layer < num_layers - 1)
    return sd


def mocov3_file(grid: int = 4, patch: int = 16, seed: int = 0) -> dict:
    """``vit-s-300ep.pth.tar``: module.base_encoder (projector in head), momentum_encoder, predictor."""
    backbone = vit_weights(patch=patch, grid=grid, seed=seed)
    backbone["pos_embed"] = mocov3_sincos_reference(grid, 384)
    g = torch.Generator().manual_seed(seed + 3)
    head = mocov3_mlp(3, 384, 64, 32, g)
    sd = {}
    for enc in ("base_encoder", "momentum_encoder"):
        sd.update({f"module.{enc}.{k}": v.clone() for k, v in backbone.items()})
        sd.update({f"module.{enc}.head.{k}": v.clone() for k, v in head.items()})
    sd.update({f"module.predictor.{k}": v for k, v in mocov3_mlp(2, 32, 64, 32, g).items()})
    return {"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


# ---------------------------------------------------------------- the publishers' forward, in plain torch
def _layer_norm(x: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def dino_interpolate(pos: torch.Tensor, x: torch.Tensor, w: int, h: int, patch: int, offset=0.1, antialias=False):
    """DINO's interpolate_pos_encoding (and DINOv2's, with its offset / antialias options): ``w, h`` are
    the input's shape[2], shape[3], as in their code."""
    npatch, n = x.shape[1] - 1, pos.shape[1] - 1
    if npatch == n and w == h:
        return pos
    dim = x.shape[-1]
    w0, h0 = w // patch, h // patch
    m = int(math.sqrt(n))
    kwargs = {"scale_factor": ((w0 + offset) / m, (h0 + offset) / m)} if offset else {"size": (w0, h0)}
    grid = F.interpolate(
        pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def rope_sincos(periods: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3 RopePositionEmbedding.forward in eval, normalize_coords='separate': (sin, cos), each (h*w, D_head)."""
    coords_h = torch.arange(0.5, h, dtype=torch.float32) / h
    coords_w = torch.arange(0.5, w, dtype=torch.float32) / w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def _rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _attention(t, sd, b, heads, rope=None, n_prefix=1):
    bsz, n, c = t.shape
    bias = sd.get(f"{b}.attn.qkv.bias")
    if bias is not None and f"{b}.attn.qkv.bias_mask" in sd:
        bias = bias * sd[f"{b}.attn.qkv.bias_mask"]  # LinearKMaskedBias
    qkv = F.linear(t, sd[f"{b}.attn.qkv.weight"], bias).reshape(bsz, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if rope is not None:
        sin, cos = rope
        q = torch.cat([q[:, :, :n_prefix], _rope_apply(q[:, :, n_prefix:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :n_prefix], _rope_apply(k[:, :, n_prefix:], sin, cos)], dim=2)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)  # DINO's explicit softmax
    out = (attn @ v).transpose(1, 2).reshape(bsz, n, c)
    return F.linear(out, sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])


def _ffn(t, sd, b):
    if f"{b}.mlp.fc1.weight" in sd:
        return F.linear(F.gelu(F.linear(t, sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"])),
                        sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])  # fmt: skip
    if f"{b}.mlp.w12.weight" in sd:  # DINOv2 SwiGLUFFN
        x1, x2 = F.linear(t, sd[f"{b}.mlp.w12.weight"], sd[f"{b}.mlp.w12.bias"]).chunk(2, dim=-1)
    else:  # DINOv3 SwiGLUFFN
        x1 = F.linear(t, sd[f"{b}.mlp.w1.weight"], sd[f"{b}.mlp.w1.bias"])
        x2 = F.linear(t, sd[f"{b}.mlp.w2.weight"], sd[f"{b}.mlp.w2.bias"])
    return F.linear(F.silu(x1) * x2, sd[f"{b}.mlp.w3.weight"], sd[f"{b}.mlp.w3.bias"])


def reference_vit(
    sd: dict,
    x01: torch.Tensor,
    heads: int,
    eps: float = 1e-6,
    pos: str = "dino",
    pool: str = "cls",
) -> torch.Tensor:
    """The publisher's eval forward: (B, 3, H, W) in [0, 1] -> final-norm class token (B, D) (or ``pool``).

    ``pos``: ``dino`` (+0.1 scale factor), ``dinov2_reg`` (size-based, antialiased), ``sincos`` (MoCo v3
    at the input's grid), ``rope`` (DINOv3), or ``timm`` (a negative control: timm's default resampling).
    """
    x = (x01 - MEAN) / STD
    proj = sd["patch_embed.proj.weight"]
    patch = proj.shape[-1]
    t = F.conv2d(x, proj, sd["patch_embed.proj.bias"], stride=patch)
    gh, gw = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    bsz = t.shape[0]
    storage = sd.get("storage_tokens", sd.get("register_tokens"))
    rope = None
    if pos == "rope":  # DINOv3: [cls, storage, patches], no absolute position
        t = torch.cat([sd["cls_token"].expand(bsz, -1, -1), storage.expand(bsz, -1, -1), t], dim=1)
        rope = rope_sincos(sd["rope_embed.periods"], gh, gw)
    else:
        t = torch.cat([sd["cls_token"].expand(bsz, -1, -1), t], dim=1)
        if pos == "sincos":
            pe = mocov3_sincos_reference(gh, t.shape[-1])
        elif pos == "timm":
            from timm.layers import resample_abs_pos_embed

            m = math.isqrt(sd["pos_embed"].shape[1] - 1)
            pe = resample_abs_pos_embed(sd["pos_embed"], (gh, gw), (m, m), num_prefix_tokens=1)
        else:
            offset, aa = (0.0, True) if pos == "dinov2_reg" else (0.1, False)
            pe = dino_interpolate(sd["pos_embed"], t, x.shape[2], x.shape[3], patch, offset, aa)
        t = t + pe
        if storage is not None:  # DINOv2 registers: after the position embedding
            t = torch.cat([t[:, :1], storage.expand(bsz, -1, -1), t[:, 1:]], dim=1)
    n_prefix = 1 + (storage.shape[1] if storage is not None else 0)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}"
        ls1, ls2 = sd.get(f"{b}.ls1.gamma", 1.0), sd.get(f"{b}.ls2.gamma", 1.0)
        t = t + ls1 * _attention(_layer_norm(t, sd, f"{b}.norm1", eps), sd, b, heads, rope, n_prefix)
        t = t + ls2 * _ffn(_layer_norm(t, sd, f"{b}.norm2", eps), sd, b)
    t = _layer_norm(t, sd, "norm", eps)
    cls, avg = t[:, 0], t[:, n_prefix:].mean(dim=1)
    return {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], dim=-1)}[pool]
