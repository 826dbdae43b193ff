"""ViT teachers: each publisher's file layout (random weights) loads, is detected, and gives the features
of an independent plain-torch re-implementation of that publisher's forward (tests/vit_reference.py), at
the stored size and at other sizes; the traps (MoCo v3's 12 heads, timm's DINOv3 defaults, timm's
antialiased resampling, LayerNorm eps) are shown to change the features.

ViT-S width (384) with 2 blocks at 32-96 px: the layout of the released files with fewer blocks.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import safetensors.torch
import timm
import torch

from models.errors import UserError
from models.io import CheckpointError
from models.teachers import load_teacher
from tests.vit_reference import (
    MEAN,
    STD,
    dinov2_file,
    dinov3_file,
    mocov3_file,
    mocov3_mlp,
    reference_vit,
    vit_weights,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mocov3_backbone(raw: dict) -> dict:
    prefix = "module.base_encoder."
    return {k[len(prefix) :]: v for k, v in raw["state_dict"].items() if k.startswith(prefix) and ".head." not in k}


def dino_full(backbone: dict) -> dict:
    """DINO's ``*_full_checkpoint.pth``: student (module.backbone/head), EMA teacher (backbone/head), args."""
    head = {"mlp.0.weight": torch.randn(64, 384), "mlp.0.bias": torch.zeros(64),
            "last_layer.weight_g": torch.ones(8, 1), "last_layer.weight_v": torch.randn(8, 64)}  # fmt: skip
    student = {f"module.backbone.{k}": v + 1 for k, v in backbone.items()}  # the student is NOT the teacher
    student.update({f"module.head.{k}": v for k, v in head.items()})
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | {f"head.{k}": v for k, v in head.items()}
    args = argparse.Namespace(arch="vit_small", patch_size=8)
    return {"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
            "args": args, "dino_loss": {"center": torch.zeros(1, 8)}}  # fmt: skip


def dinov2_teacher_checkpoint(backbone: dict) -> dict:
    """DINOv2's eval ``teacher_checkpoint.pth``: {'teacher': backbone.* with block_chunks (blocks.<chunk>.<i>),
    dino_head.*, ibot_head.*} (two blocks in two chunks)."""
    chunked = {(k.replace("blocks.", f"blocks.{k.split('.')[1]}.", 1) if k.startswith("blocks.") else k): v
               for k, v in backbone.items()}  # fmt: skip
    heads = {"dino_head.mlp.0.weight": torch.randn(8, 384), "ibot_head.mlp.0.weight": torch.randn(8, 384)}
    return {"teacher": {f"backbone.{k}": v for k, v in chunked.items()} | heads}


# name: (file, backbone tensors for the reference, format, arch, reference options, patch)
CASES = {
    "dino": (lambda: vit_weights(patch=8), None, "dino_vit", "vit_s8_depth2", {"heads": 6, "pos": "dino"}, 8),
    "dino_full": (
        lambda: dino_full(vit_weights(patch=8)),
        lambda r: {k[9:]: v for k, v in r["teacher"].items() if k.startswith("backbone.")},
        "dino_vit",
        "vit_s8_depth2",
        {"heads": 6, "pos": "dino"},
        8,
    ),  # fmt: skip
    "dinov2": (dinov2_file, None, "dinov2", "vit_s14_depth2", {"heads": 6, "pos": "dino"}, 14),
    "dinov2_teacher_checkpoint": (
        lambda: dinov2_teacher_checkpoint(dinov2_file()),
        lambda r: dinov2_file(),
        "dinov2",
        "vit_s14_depth2",
        {"heads": 6, "pos": "dino"},
        14,
    ),  # fmt: skip
    "dinov2_reg4": (
        lambda: dinov2_file(n_reg=4),
        None,
        "dinov2",
        "vit_s14_reg4_depth2",
        {"heads": 6, "pos": "dinov2_reg"},
        14,
    ),  # fmt: skip
    "dinov2_swiglu": (
        lambda: dinov2_file(ffn="w12"),
        None,
        "dinov2",
        "vit_s14_depth2",
        {"heads": 6, "pos": "dino"},
        14,
    ),
    "dinov3": (dinov3_file, None, "dinov3", "vit_s16_depth2", {"heads": 6, "pos": "rope", "eps": 1e-5}, 16),
    "dinov3_plus": (
        lambda: dinov3_file(ffn="w123"),
        None,
        "dinov3",
        "vit_splus16_depth2",
        {"heads": 6, "pos": "rope", "eps": 1e-5},
        16,
    ),  # fmt: skip
    "mocov3": (mocov3_file, mocov3_backbone, "mocov3_vit", "vit_s16_depth2", {"heads": 12, "pos": "sincos"}, 16),
}


def _saved(tmp_path, raw, name="teacher.pth"):
    path = str(tmp_path / name)
    torch.save(raw, path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_vit_features_equal_the_publishers_forward(tmp_path, case):
    make, backbone_of, fmt, arch, ref_kw, patch = CASES[case]
    raw = make()
    teacher = load_teacher(_saved(tmp_path, raw))
    assert (teacher.fmt, teacher.arch, teacher.feat_dim, teacher.input_norm) == (fmt, arch, 384, "imagenet")
    sd = backbone_of(raw) if backbone_of else raw
    torch.manual_seed(1)
    for grid in (4, 6, 3):  # the stored grid (the training size), larger, smaller
        x = torch.rand(2, 3, grid * patch, grid * patch)
        assert rel(teacher(x), reference_vit(sd, x, **ref_kw)) < 1e-4, grid


@pytest.mark.parametrize("case", ["dino", "dinov2", "dinov3"])
def test_a_wrong_layernorm_eps_would_fail(case):
    """The weights make eps matter: 1e-6 (DINO, DINOv2) and 1e-5 (DINOv3) give features far apart."""
    make, _, _, _, ref_kw, patch = CASES[case]
    x = torch.rand(2, 3, 4 * patch, 4 * patch)
    wrong = {**ref_kw, "eps": 1e-5 if ref_kw.get("eps", 1e-6) == 1e-6 else 1e-6}
    assert rel(reference_vit(make(), x, **wrong), reference_vit(make(), x, **ref_kw)) > 1e-2


@pytest.mark.parametrize("case", ["dino", "dinov2"])
def test_dino_interpolation_is_not_timms_antialiased_resize(tmp_path, case):
    """DINO / DINOv2 resample with scale_factor (n + 0.1) / M, no antialias; timm's resize differs."""
    make, _, _, _, ref_kw, patch = CASES[case]
    raw = make()
    teacher = load_teacher(_saved(tmp_path, raw))
    x = torch.rand(2, 3, 6 * patch, 6 * patch)
    ours, theirs = teacher(x), reference_vit(raw, x, **{**ref_kw, "pos": "timm"})
    assert rel(ours, reference_vit(raw, x, **ref_kw)) < 1e-4 and rel(ours, theirs) > 1e-3


def test_mocov3_vit_s_has_twelve_heads_and_six_would_differ(tmp_path):
    raw = mocov3_file()
    path = _saved(tmp_path, raw)
    teacher = load_teacher(path)
    assert teacher.encoder.backbone.blocks[0].attn.num_heads == 12
    sd, x = mocov3_backbone(raw), torch.rand(2, 3, 64, 64)
    twelve, six = reference_vit(sd, x, heads=12, pos="sincos"), reference_vit(sd, x, heads=6, pos="sincos")
    assert rel(teacher(x), twelve) < 1e-4 and rel(six, twelve) > 1e-2
    as_dino = load_teacher(path, fmt="dino_vit")  # the same shapes read with timm's / DINO's 6 heads
    assert as_dino.encoder.backbone.blocks[0].attn.num_heads == 6 and rel(as_dino(x), twelve) > 1e-2


def test_mocov3_plain_files_are_recognised_by_their_sincos_embedding(tmp_path):
    """convert_to_deit.py's ``{'model': ...}`` and main_lincls's ``module.*`` + ``head`` (the classifier)."""
    sd = mocov3_backbone(mocov3_file())
    deit = load_teacher(_saved(tmp_path, {"model": sd}, "deit.pth"))
    lincls = {f"module.{k}": v for k, v in sd.items()} | {"module.head.weight": torch.randn(10, 384),
                                                          "module.head.bias": torch.randn(10)}  # fmt: skip
    linear = load_teacher(_saved(tmp_path, {"state_dict": lincls, "best_acc1": 76.5}, "lin.pth"), use_fc=True)
    x = torch.rand(2, 3, 64, 64)
    cls = reference_vit(sd, x, heads=12, pos="sincos")
    assert deit.fmt == linear.fmt == "mocov3_vit" and rel(deit(x), cls) < 1e-4
    assert rel(linear(x), cls @ lincls["module.head.weight"].T + lincls["module.head.bias"]) < 1e-4


def test_mocov3_teacher_fc_regresses_the_three_layer_bn_projector(tmp_path, caplog):
    raw = mocov3_file()
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(_saved(tmp_path, raw), use_fc=True)
    head_sd = mocov3_mlp(3, 384, 64, 32, torch.Generator().manual_seed(3))
    proj = torch.nn.Sequential(torch.nn.Linear(384, 64, bias=False), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 64, bias=False), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 32, bias=False), torch.nn.BatchNorm1d(32, affine=False))  # fmt: skip
    proj.load_state_dict(head_sd, strict=True)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = proj.eval()(reference_vit(mocov3_backbone(raw), x, heads=12, pos="sincos"))
    assert teacher.feat_dim == 32 and rel(teacher(x), expected) < 1e-4
    log = caplog.text
    assert "momentum_encoder.* (" in log and "predictor.* (" in log and "base_encoder.head.* (" in log


@pytest.mark.parametrize("pool", ["avg", "cls+avg"])
def test_teacher_pool_alternatives(tmp_path, pool):
    raw = dinov2_file(n_reg=4)
    teacher = load_teacher(_saved(tmp_path, raw), pool=pool)
    x = torch.rand(2, 3, 56, 56)
    assert teacher.pool == pool and teacher.feat_dim == (768 if pool == "cls+avg" else 384)
    assert rel(teacher(x), reference_vit(raw, x, heads=6, pos="dinov2_reg", pool=pool)) < 1e-4


def test_dinov2_drops_and_lists_mask_token_and_uses_fused_attention(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(_saved(tmp_path, dinov2_file()))
    assert "dropped 1 non-backbone key(s): mask_token" in caplog.text
    assert teacher.encoder.backbone.blocks[0].attn.fused_attn  # F.scaled_dot_product_attention (bf16: fused kernels)


def test_dino_full_checkpoint_reads_the_ema_teacher_and_lists_the_rest(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(_saved(tmp_path, dino_full(vit_weights(patch=8))))
    assert (
        teacher.fmt == "dino_vit"
        and "teacher.head.* (4 keys)" in caplog.text
        and "student.module.* (34 keys)" in caplog.text
    )


def test_dinov3_in_timm_under_a_plausible_name_loads_strictly_and_computes_other_features(tmp_path):
    """timm's ``vit_small_patch16_dinov3`` (no q/v bias, 'avg' pooling, recomputed RoPE periods) accepts the
    official file through its own converter, strictly; only the publisher's settings give DINOv3's feature."""
    raw = dinov3_file()
    x = torch.rand(2, 3, 64, 64)
    reference = reference_vit(raw, x, heads=6, pos="rope", eps=1e-5)
    net = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, depth=2).eval()
    net.load_state_dict(timm.models.eva.checkpoint_filter_fn(dict(raw), net), strict=True)
    with torch.no_grad():
        assert rel(net((x - MEAN) / STD), reference) > 0.1
    assert rel(load_teacher(_saved(tmp_path, raw))(x), reference) < 1e-4


def test_dinov3_key_bias_must_be_masked_and_untied_norms_are_refused(tmp_path):
    raw = dinov3_file()
    raw["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * 384)  # the key bias would be used
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.bias_mask is not ones"):
        load_teacher(_saved(tmp_path, raw))
    raw = dinov3_file() | {"cls_norm.weight": torch.ones(384), "cls_norm.bias": torch.zeros(384)}
    with pytest.raises(CheckpointError, match="separate class-token norm"):
        load_teacher(_saved(tmp_path, raw))
    raw = dinov3_file() | {"local_cls_norm.weight": torch.ones(384), "local_cls_norm.bias": torch.zeros(384)}
    assert load_teacher(_saved(tmp_path, raw)).fmt == "dinov3"  # training-only norm: dropped, listed


def test_missing_and_unexpected_keys_are_named(tmp_path):
    raw = dinov2_file()
    del raw["blocks.1.norm2.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): blocks\.1\.norm2\.weight"):
        load_teacher(_saved(tmp_path, raw))
    raw = vit_weights(patch=8) | {"blocks.0.attn.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): blocks\.0\.attn\.extra\.weight"):
        load_teacher(_saved(tmp_path, raw))


def test_unknown_layouts_and_widths_are_refused_with_a_sentence(tmp_path):
    hf = {
        "embeddings.cls_token": torch.zeros(1, 1, 384),
        "encoder.layer.0.attention.attention.query.weight": torch.zeros(2),
    }
    with pytest.raises(CheckpointError, match="could not recognise the layout of"):
        load_teacher(_saved(tmp_path, hf))
    narrow = vit_weights(width=256, patch=8)
    with pytest.raises(CheckpointError, match="width 256; DINO publishes widths 192, 384, 768 only"):
        load_teacher(_saved(tmp_path, narrow))
    with pytest.raises(CheckpointError, match="holds a DINOv2 vit_s14_depth2 .*leave --arch_teacher unset"):
        load_teacher(_saved(tmp_path, dinov2_file()), arch="resnet50")


def test_sizes_not_a_multiple_of_the_patch_are_refused(tmp_path):
    path = _saved(tmp_path, dinov2_file())
    with pytest.raises(
        UserError,
        match=r"crop size \(--image_size / --crop_size\) of 30x30 px is not a multiple of the ViT teacher's patch size",
    ):
        load_teacher(path, input_size=30)
    with pytest.raises(UserError, match="not a multiple of the ViT teacher's patch size 14"):
        load_teacher(path)(torch.rand(1, 3, 56, 60))
    with pytest.raises(UserError, match="--teacher_pool avg applies to ViT teachers"):
        load_teacher(_saved(tmp_path, timm.create_model("resnet18").state_dict(), "r18.pth"), pool="avg")


def test_a_safetensors_teacher_loads_like_the_pth(tmp_path):
    raw = dinov3_file()
    st = str(tmp_path / "model.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in raw.items()}, st)
    other_name = str(tmp_path / "dinov3.bin")  # recognised by its header, not its name
    safetensors.torch.save_file({k: v.contiguous() for k, v in raw.items()}, other_name)
    x = torch.rand(2, 3, 48, 48)
    expected = load_teacher(_saved(tmp_path, raw))(x)
    assert torch.equal(load_teacher(st)(x), expected) and torch.equal(load_teacher(other_name)(x), expected)
