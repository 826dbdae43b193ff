"""Hugging Face snapshots as teachers: features equal transformers' own forward (tests/hf_reference.py) at
224 px and at another size, for every supported model type; poolings, patch tokens, preprocessing;
shards, pytorch_model.bin, bare files; strict key accounting; shapes of the published models at full size.

Checked against transformers 5.24.0: ``models/dinov2/modeling_dinov2.py``,
``models/dinov2_with_registers/modeling_dinov2_with_registers.py``, ``models/dinov3_vit/modeling_dinov3_vit.py``,
``models/dinov3_convnext/modeling_dinov3_convnext.py``, ``models/clip/modeling_clip.py``,
``models/siglip/modeling_siglip.py``, ``models/vit/modeling_vit.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import safetensors.torch
import torch
import transformers as tf

from models.errors import UserError
from models.hf_checkpoints import read_weights
from models.hf_configs import DEFAULTS, HEADS
from models.hf_layouts import convert
from models.hf_networks import build_hf_network, patch_tokens, resample_grid
from models.io import CheckpointError
from models.teachers import load_teacher
from tests.hf_reference import CASES, OTHER_SIZE, build, outputs, reference, rel, vision, write_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4  # relative difference to transformers' forward (measured: below 1e-6 for every case)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict:
    """case -> (transformers model, snapshot folder)."""
    root, out = tmp_path_factory.mktemp("hf"), {}
    for case in CASES:
        model = build(case)
        out[case] = (model, write_snapshot(model, str(root / case)))
    return out


def normalised(teacher, x01: torch.Tensor) -> torch.Tensor:
    return teacher.encoder.normalize(x01)


# ---------------------------------------------------------------- exact to transformers
@pytest.mark.parametrize("case", sorted(CASES))
def test_features_equal_transformers_pooled_output_at_224_and_another_size(snapshots, case):
    model, folder = snapshots[case]
    teacher = load_teacher(folder)
    for size in (224, OTHER_SIZE[case]):
        x01 = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        expected = reference(case, model, normalised(teacher, x01))
        assert teacher(x01).shape == expected.shape and rel(teacher(x01), expected) < TOL, (case, size)


@pytest.mark.parametrize("case", ["clip", "clip_projection"])
def test_teacher_fc_gives_clips_projected_image_embedding(snapshots, case, caplog):
    model, folder = snapshots[case]
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(folder, use_fc=True)
    assert teacher.feat_dim == 24 and "CLIP's visual_projection (the image embedding) (24-d)" in caplog.text
    for size in (224, 160):
        x01 = torch.rand(2, 3, size, size)
        assert rel(teacher(x01), reference(case, model, normalised(teacher, x01), fc=True)) < TOL


def test_teacher_fc_on_a_tower_without_projection_is_refused(snapshots):
    with pytest.raises(CheckpointError, match="stores no projection head after the backbone; drop --teacher_fc"):
        load_teacher(snapshots["siglip"][1], use_fc=True)


@pytest.mark.parametrize(
    ("case", "prefix"),
    [("dinov2_registers", 5), ("dinov3", 5), ("clip", 1), ("siglip", 0), ("vit", 1), ("dinov2", 1)],
)
def test_avg_and_cls_avg_pool_the_final_norm_patch_tokens_without_registers(snapshots, case, prefix):
    model, folder = snapshots[case]
    x01 = torch.rand(2, 3, 224, 224)
    teacher = load_teacher(folder, pool="avg")
    tokens = outputs(case, model, normalised(teacher, x01)).last_hidden_state
    if case.startswith("clip"):  # CLIP's last_hidden_state is before post_layernorm; its pooled CLS after it
        tokens = vision(model).post_layernorm(tokens)
    avg = tokens[:, prefix:].mean(dim=1)
    assert rel(teacher(x01), avg) < TOL
    if prefix:
        both = load_teacher(folder, pool="cls+avg")
        assert both.feat_dim == 64 and rel(both(x01), torch.cat([tokens[:, 0], avg], dim=-1)) < TOL


def test_siglip_has_no_class_token_to_pool(snapshots):
    for pool in ("cls", "cls+avg"):
        with pytest.raises(UserError, match="without a class token; use auto .* or avg"):
            load_teacher(snapshots["siglip"][1], pool=pool)
    with pytest.raises(UserError, match="DINOv3 ConvNeXt whose feature is its own pooled output"):
        load_teacher(snapshots["dinov3_convnext"][1], pool="avg")


@pytest.mark.parametrize(
    ("case", "prefix"),
    [("dinov2_registers", 5), ("dinov3", 5), ("clip", 1), ("siglip", 0), ("vit", 1), ("dinov3_convnext", 1)],
)
def test_patch_tokens_are_the_final_norm_patches_for_a_dense_objective(snapshots, case, prefix):
    model, folder = snapshots[case]
    teacher = load_teacher(folder)
    stride = 32 if case == "dinov3_convnext" else teacher.encoder.backbone.patch
    x01 = torch.rand(2, 3, 224, 5 * stride)  # not square: rows and columns in the right order
    with torch.no_grad():
        got = patch_tokens(teacher, x01)
    tokens = outputs(case, model, normalised(teacher, x01)).last_hidden_state
    if case.startswith("clip"):
        tokens = vision(model).post_layernorm(tokens)
    assert got.shape == (2, 224 // stride, 5, tokens.shape[-1])
    assert rel(got.flatten(1, 2), tokens[:, prefix:]) < TOL


# ---------------------------------------------------------------- the numerics that matter are shown to matter
def test_the_resampling_of_each_class_matters(snapshots):
    """DINOv2: bicubic to size, no antialias (the hub code's +0.1 offset differs); with registers: antialiased."""
    grid = torch.randn(1, 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    plain, smooth = resample_grid(grid, 37, 16, 16, False), resample_grid(grid, 37, 16, 16, True)
    offset = torch.nn.functional.interpolate(
        grid.reshape(1, 37, 37, 8).permute(0, 3, 1, 2), scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic"
    )
    assert rel(plain, offset.permute(0, 2, 3, 1).reshape(1, 256, 8)) > 1e-2 and rel(plain, smooth) > 1e-1
    model, folder = snapshots["dinov2"]
    teacher = load_teacher(folder)
    x01 = torch.rand(2, 3, 224, 224)
    net = teacher.encoder.backbone
    net.spec = net.spec.__class__(**{**net.spec.__dict__, "pos": "antialias"})  # as if it had registers
    assert rel(teacher(x01), reference("dinov2", model, normalised(teacher, x01))) > 3 * TOL  # measured: 7.6e-4


def test_clip_activation_and_post_layernorm_matter(snapshots):
    model, folder = snapshots["clip"]
    x01 = torch.rand(2, 3, 224, 224)
    teacher = load_teacher(folder)
    expected = reference("clip", model, normalised(teacher, x01))
    raw_cls = outputs("clip", model, normalised(teacher, x01)).last_hidden_state[:, 0]
    assert rel(raw_cls, expected) > 10 * TOL  # the pooled output is post_layernorm(CLS), not the raw CLS
    for block in teacher.encoder.backbone.blocks:
        block.mlp.act = torch.nn.GELU()  # LAION's activation on OpenAI's weights
    assert rel(teacher(x01), expected) > 10 * TOL


# ---------------------------------------------------------------- preprocessing
def test_preprocessing_comes_from_preprocessor_config_else_the_model_types_values(snapshots, tmp_path, caplog):
    model, folder = snapshots["dinov3"]
    sat = {"image_mean": [0.430, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143], "size": {"height": 224}}
    with_pre = write_snapshot(model, str(tmp_path / "sat"), preprocessor=sat)
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(with_pre)
    assert teacher.input_norm == "mean/std (0.43, 0.411, 0.296)"
    assert "input mean/std (0.43, 0.411, 0.296)/(0.213, 0.156, 0.143) from preprocessor_config.json" in caplog.text
    x01 = torch.rand(2, 3, 224, 224)
    mean, std = torch.tensor(sat["image_mean"]).view(1, 3, 1, 1), torch.tensor(sat["image_std"]).view(1, 3, 1, 1)
    assert rel(teacher(x01), reference("dinov3", model, (x01 - mean) / std)) < TOL
    caplog.clear()
    expected = {"dinov3": "imagenet", "clip": "mean/std (0.4815, 0.4578, 0.4082)", "siglip": "mean/std (0.5, 0.5, 0.5)"}
    for case, norm in expected.items():
        with caplog.at_level(logging.INFO):
            assert load_teacher(snapshots[case][1]).input_norm == norm
    assert caplog.text.count("published values (no preprocessor_config.json)") == 3


# ---------------------------------------------------------------- the ways snapshots are stored
def test_sharded_snapshot_loads_and_a_missing_shard_is_named(snapshots, tmp_path):
    model, _ = snapshots["dinov2_swiglu"]
    folder = write_snapshot(model, str(tmp_path / "sharded"), max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(folder) if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) >= 2 and os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    x01 = torch.rand(2, 3, 224, 224)
    teacher = load_teacher(folder)
    assert rel(teacher(x01), reference("dinov2_swiglu", model, normalised(teacher, x01))) < TOL
    os.remove(os.path.join(folder, shards[-1]))
    with pytest.raises(CheckpointError, match=rf"lacks 1 of the {len(shards)} shards .*{shards[-1]}.* incomplete"):
        load_teacher(folder)


def test_pytorch_model_bin_is_read_weights_only(snapshots, tmp_path, caplog):
    """transformers 4's CLIP files also saved the position_ids buffers: dropped and listed."""
    model, folder = snapshots["clip"]
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), old / "config.json")
    sd = safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))
    sd["vision_model.embeddings.position_ids"] = torch.arange(197)[None]
    torch.save(sd, old / "pytorch_model.bin")
    x01 = torch.rand(2, 3, 224, 224)
    with caplog.at_level(logging.INFO):
        assert torch.equal(load_teacher(str(old))(x01), load_teacher(folder)(x01))
    assert "dropped 24 non-backbone key(s)" in caplog.text and "vision_model.embeddings.*" in caplog.text
    (old / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        load_teacher(str(old))


def test_clip_vision_files_with_and_without_the_vision_model_prefix(snapshots, tmp_path):
    """transformers 4 saved CLIPVisionModel as vision_model.*; transformers 5 saves it without the prefix."""
    _, folder = snapshots["clip_vision"]
    sd = safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in sd)
    old = tmp_path / "v4"
    old.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), old / "config.json")
    safetensors.torch.save_file({f"vision_model.{k}": v for k, v in sd.items()}, str(old / "model.safetensors"))
    x01 = torch.rand(2, 3, 224, 224)
    assert torch.equal(load_teacher(str(old))(x01), load_teacher(folder)(x01))


def test_dinov3_files_of_the_earlier_conversion_read_like_todays(snapshots, tmp_path):
    """query/key/value/proj, patch_embeddings.proj, layer_scale*.gamma, mlp.w1/w2/w3 and its config fields."""
    model, folder = snapshots["dinov3_gated"]
    sd = safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))
    renames = [
        (".attention.q_proj.", ".attention.query."),
        (".attention.k_proj.", ".attention.key."),
        (".attention.v_proj.", ".attention.value."),
        (".attention.o_proj.", ".attention.proj."),
        ("patch_embeddings.", "patch_embeddings.proj."),
        (".lambda1", ".gamma"),
        (".gate_proj.", ".w1."),
        (".up_proj.", ".w2."),
        (".down_proj.", ".w3."),
    ]
    old_sd = {}
    for k, v in sd.items():
        for a, b in renames:
            k = k.replace(a, b)
        old_sd[k] = v
    assert "layer.0.attention.query.weight" in old_sd and "embeddings.patch_embeddings.proj.weight" in old_sd
    old_sd["rope_embeddings.periods"] = torch.ones(4)  # the earlier conversion kept the hub's periods
    old = tmp_path / "dinov3_v0"
    old.mkdir()
    safetensors.torch.save_file(old_sd, str(old / "model.safetensors"))
    config = {
        "model_type": "dinov3_vit",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 16,
        "mlp_ratio": 2.25,
        "use_swiglu_ffn": True,
        "hidden_act": "silu",
        "qkv_bias": True,
        "mask_k_bias": True,
        "pos_embed_rope_base": 100,
        "num_register_tokens": 4,
        "layer_norm_eps": 1e-5,
    }
    (old / "config.json").write_text(json.dumps(config))
    teacher = load_teacher(str(old))
    for size in (224, 96):
        x01 = torch.rand(2, 3, size, size)
        assert rel(teacher(x01), reference("dinov3_gated", model, normalised(teacher, x01))) < TOL


def test_a_snapshots_own_weights_file_uses_the_config_beside_it(snapshots, caplog):
    model, folder = snapshots["clip_laion"]
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(os.path.join(folder, "model.safetensors"))
    assert "reading config.json (and preprocessor_config.json, if any) beside it" in caplog.text
    x01 = torch.rand(2, 3, 224, 224)
    assert rel(teacher(x01), reference("clip_laion", model, normalised(teacher, x01))) < TOL


BARE = {  # published widths (the head count comes from the model type's constructor), 1 block
    "dinov2": (
        tf.Dinov2Model,
        lambda: tf.Dinov2Config(
            hidden_size=384, num_hidden_layers=1, num_attention_heads=6, image_size=518, patch_size=14, mlp_ratio=1
        ),
    ),
    "dinov2_registers": (
        tf.Dinov2WithRegistersModel,
        lambda: tf.Dinov2WithRegistersConfig(
            hidden_size=384, num_hidden_layers=1, num_attention_heads=6, image_size=518, patch_size=14, mlp_ratio=1
        ),
    ),
    "dinov3_gated": (
        tf.DINOv3ViTModel,
        lambda: tf.DINOv3ViTConfig(
            hidden_size=384,
            num_hidden_layers=1,
            num_attention_heads=6,
            intermediate_size=64,
            num_register_tokens=4,
            use_gated_mlp=True,
            hidden_act="silu",
        ),
    ),
    "siglip": (
        tf.SiglipModel,
        lambda: tf.SiglipConfig(
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48),
            vision_config=dict(
                hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64, patch_size=16
            ),
        ),
    ),
    "dinov3_convnext": CASES["dinov3_convnext"],
}


@pytest.mark.parametrize("case", sorted(BARE))
def test_a_bare_safetensors_file_is_read_from_its_shapes(tmp_path, case, caplog):
    cls, config = BARE[case]
    torch.manual_seed(0)
    from tests.hf_reference import randomized

    model = randomized(cls(config()))
    folder = write_snapshot(model, str(tmp_path / "snap"))
    bare = str(tmp_path / "weights.safetensors")
    shutil.copy(os.path.join(folder, "model.safetensors"), bare)
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(bare)
    assert "published values (no preprocessor_config.json)" in caplog.text
    for size in (224, 112):
        x01 = torch.rand(2, 3, size, size)
        expected = reference(case, model, normalised(teacher, x01))
        assert rel(teacher(x01), expected) < TOL and torch.equal(teacher(x01), load_teacher(folder)(x01))


# ---------------------------------------------------------------- strict: nothing missing, nothing unexplained
def test_a_missing_tensor_is_named(snapshots, tmp_path):
    _, folder = snapshots["dinov2_registers"]
    broken = shutil.copytree(folder, tmp_path / "broken")
    sd = safetensors.torch.load_file(str(broken / "model.safetensors"))
    del sd["encoder.layer.1.layer_scale2.lambda1"], sd["embeddings.position_embeddings"]
    safetensors.torch.save_file(sd, str(broken / "model.safetensors"))
    names = r"embeddings.position_embeddings, encoder.layer.1.layer_scale2.lambda1; the download is incomplete"
    with pytest.raises(CheckpointError, match=r"lacks 2 tensor\(s\) .*" + names):
        load_teacher(str(broken))


def test_unknown_tensors_and_mismatched_configs_are_refused(snapshots, tmp_path):
    _, folder = snapshots["siglip_vision"]
    extra = shutil.copytree(folder, tmp_path / "extra")
    sd = safetensors.torch.load_file(str(extra / "model.safetensors"))
    safetensors.torch.save_file(sd | {"adapter.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unrecognised key\(s\): adapter.weight"):
        load_teacher(str(extra))
    other = shutil.copytree(folder, tmp_path / "other")
    config = json.loads((other / "config.json").read_text()) | {"intermediate_size": 64}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"encoder.layers.0.mlp.fc1.weight \(48, 32\) \(needs \(64, 32\)\)"):
        load_teacher(str(other))
    mixed = shutil.copytree(folder, tmp_path / "mixed")
    (mixed / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(CheckpointError, match="says model_type 'dinov2' but the weights are a SigLIP model's"):
        load_teacher(str(mixed))


def test_every_dropped_tensor_is_listed(snapshots, caplog):
    with caplog.at_level(logging.INFO):
        load_teacher(snapshots["clip"][1])
        load_teacher(snapshots["vit"][1])
    assert "dropped 23 non-backbone key(s): logit_scale, text_model.* (20 keys)" in caplog.text
    assert "text_projection.weight" in caplog.text and "visual_projection.weight" in caplog.text
    assert "dropped 2 non-backbone key(s): pooler.dense.* (2 keys)" in caplog.text


def test_arch_flag_and_refused_types(snapshots, tmp_path):
    _, folder = snapshots["dinov2"]
    with pytest.raises(CheckpointError, match="holds a DINOv2 hf_dinov2_vit_w32_p14_depth2 .* leave --arch_teacher"):
        load_teacher(folder, arch="resnet50")
    naflex = shutil.copytree(folder, tmp_path / "naflex")
    (naflex / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(CheckpointError, match="NaFlex .* use a fixed-resolution SigLIP 2 checkpoint"):
        load_teacher(str(naflex))


# ---------------------------------------------------------------- the published models at full size (meta tensors)
PUBLISHED = {  # model id -> (class, config of the published checkpoint, network name, feature size)
    "facebook/dinov2-with-registers-giant": (
        tf.Dinov2WithRegistersModel,
        dict(
            hidden_size=1536,
            num_hidden_layers=40,
            num_attention_heads=24,
            use_swiglu_ffn=True,
            image_size=518,
            patch_size=14,
        ),
        "hf_dinov2_vit_g14_reg4",
        1536,
    ),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": (
        tf.DINOv3ViTModel,
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_register_tokens=4,
        ),
        "hf_dinov3_vit_l16",
        1024,
    ),
    "openai/clip-vit-base-patch32": (tf.CLIPModel, dict(projection_dim=512), "hf_clip_vit_b32", 768),
    "facebook/dino-vitb16": (tf.ViTModel, dict(layer_norm_eps=1e-6), "hf_vit_b16", 768),
    "google/siglip-base-patch16-224": (tf.SiglipModel, dict(), "hf_siglip_vit_b16", 768),
    "facebook/dinov2-small": (
        tf.Dinov2Model,
        dict(hidden_size=384, num_attention_heads=6, image_size=518),
        "hf_dinov2_vit_s14",
        384,
    ),
    "facebook/dinov2-giant": (
        tf.Dinov2Model,
        dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True, image_size=518),
        "hf_dinov2_vit_g14",
        1536,
    ),
    "facebook/dinov2-with-registers-large": (
        tf.Dinov2WithRegistersModel,
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14),
        "hf_dinov2_vit_l14_reg4",
        1024,
    ),
    "facebook/dinov3-vits16plus-pretrain-lvd1689m": (
        tf.DINOv3ViTModel,
        dict(
            hidden_size=384,
            intermediate_size=1536,
            num_attention_heads=6,
            num_register_tokens=4,
            use_gated_mlp=True,
            hidden_act="silu",
        ),
        "hf_dinov3_vit_splus16",
        384,
    ),
    "facebook/dinov3-vit7b16-pretrain-lvd1689m": (
        tf.DINOv3ViTModel,
        dict(
            hidden_size=4096,
            intermediate_size=8192,
            num_hidden_layers=40,
            num_attention_heads=32,
            query_bias=False,
            value_bias=False,
            num_register_tokens=4,
            use_gated_mlp=True,
            hidden_act="silu",
        ),
        "hf_dinov3_vit_7b16",
        4096,
    ),
    "facebook/dinov3-convnext-base-pretrain-lvd1689m": (
        tf.DINOv3ConvNextModel,
        dict(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3]),
        "hf_dinov3_convnext_base",
        1024,
    ),
    "openai/clip-vit-large-patch14-336": (
        tf.CLIPModel,
        dict(
            projection_dim=768,
            vision_config=dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
            ),
        ),
        "hf_clip_vit_l14",
        1024,
    ),
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": (
        tf.CLIPModel,
        dict(
            projection_dim=1280,
            vision_config=dict(
                hidden_size=1664,
                intermediate_size=8192,
                num_hidden_layers=48,
                num_attention_heads=16,
                patch_size=14,
                hidden_act="gelu",
            ),
            text_config=dict(hidden_size=1280, num_attention_heads=20, intermediate_size=5120, num_hidden_layers=32),
        ),
        "hf_clip_vit_bigG14",
        1664,
    ),
    "google/siglip-so400m-patch14-384": (
        tf.SiglipModel,
        dict(
            vision_config=dict(
                hidden_size=1152,
                intermediate_size=4304,
                num_hidden_layers=27,
                num_attention_heads=16,
                image_size=384,
                patch_size=14,
            )
        ),
        "hf_siglip_vit_so400m14",
        1152,
    ),
    "google/siglip2-giant-opt-patch16-256": (
        tf.SiglipModel,
        dict(
            vision_config=dict(
                hidden_size=1536,
                intermediate_size=6144,
                num_hidden_layers=40,
                num_attention_heads=16,
                image_size=256,
                patch_size=16,
            )
        ),
        "hf_siglip_vit_g16",
        1536,
    ),
}


@pytest.mark.parametrize("model_id", sorted(PUBLISHED))
def test_published_configs_map_every_tensor_onto_the_network_at_full_size(model_id):
    """transformers builds the published model on the meta device; the names and shapes its save_pretrained
    writes (revert_weight_conversion) map strictly onto the network built from the same config.json."""
    from transformers.core_model_loading import revert_weight_conversion

    cls, fields, name, dim = PUBLISHED[model_id]
    config = cls.config_class(**fields)
    with torch.device("meta"):
        model = cls(config)
    files = revert_weight_conversion(model, model.state_dict())
    from models.hf_layouts import HFCheckpoint

    hf = convert(HFCheckpoint(files, config.to_dict(), None, model_id))
    net = build_hf_network(hf.spec, "cls" if hf.spec.pooled == "cls" else hf.spec.pooled)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith((".k_bias", "rope.periods"))}
    assert {k: tuple(v.shape) for k, v in hf.backbone.items()} == own
    assert (hf.spec.name, net.feat_dim) == (name, dim)


def test_defaults_and_head_tables_are_transformers_own():
    classes = {
        "dinov2": tf.Dinov2Config,
        "dinov2_with_registers": tf.Dinov2WithRegistersConfig,
        "dinov3_vit": tf.DINOv3ViTConfig,
        "dinov3_convnext": tf.DINOv3ConvNextConfig,
        "clip": tf.CLIPVisionConfig,
        "siglip": tf.SiglipVisionConfig,
        "vit": tf.ViTConfig,
    }
    for family, fields in DEFAULTS.items():
        config = classes[family]()
        assert {k: getattr(config, k) for k in fields} == fields, family
    assert HEADS["dinov2"] == {384: 6, 768: 12, 1024: 16, 1536: 24}


def test_read_weights_of_a_plain_file_is_the_plain_file(tmp_path, resnet18_teacher_file):
    assert isinstance(read_weights(resnet18_teacher_file), dict)


def test_a_snapshot_named_as_a_hub_format_or_a_timm_model_is_told_what_it_is(snapshots):
    _, folder = snapshots["dinov2"]
    with pytest.raises(CheckpointError, match="is a Hugging Face checkpoint, not a 'dinov2' file: pass --teacher_fo"):
        load_teacher(folder, fmt="dinov2")
    with pytest.raises(CheckpointError, match="the file is a 'huggingface' checkpoint: leave --arch_teacher unset"):
        load_teacher(folder, arch="timm/vit_small_patch14_dinov2")


@pytest.mark.parametrize(
    ("cls", "case"), [(tf.Dinov2ForImageClassification, "dinov2"), (tf.ViTForImageClassification, "vit")]
)
def test_classification_files_give_their_backbone_and_drop_the_classifier(tmp_path, cls, case, caplog):
    torch.manual_seed(0)
    from tests.hf_reference import randomized

    model = randomized(cls(CASES[case][1]() if case == "vit" else tf.Dinov2Config(**_tiny_dinov2(), num_labels=3)))
    folder = write_snapshot(model, str(tmp_path / case))
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(folder)
    base = getattr(model, case)
    x01 = torch.rand(2, 3, 224, 224)
    assert rel(teacher(x01), reference(case, base, normalised(teacher, x01))) < TOL
    assert "classifier.* (2 keys)" in caplog.text


def _tiny_dinov2() -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=518, patch_size=14)


@pytest.mark.parametrize("case", ["dinov2_swiglu", "vit"])
def test_transformers_own_in_memory_names_read_like_the_published_ones(snapshots, tmp_path, case):
    """torch.save(model.state_dict()) of a transformers 5 model: q_proj/o_proj, gate/up/down_proj, layers.i."""
    model, folder = snapshots[case]
    inner = tmp_path / "inner"
    inner.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), inner / "config.json")
    sd = model.state_dict()
    assert any(".q_proj." in k for k in sd)
    torch.save(sd, inner / "weights.pth")
    x01 = torch.rand(2, 3, 224, 224)
    assert torch.equal(load_teacher(str(inner / "weights.pth"))(x01), load_teacher(folder)(x01))


def test_sharded_pytorch_model_bin(snapshots, tmp_path):
    model, folder = snapshots["siglip"]
    sd = safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    old = tmp_path / "bin_shards"
    old.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), old / "config.json")
    for shard, keys in halves.items():
        torch.save({k: sd[k] for k in keys}, old / shard)
    index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (old / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    x01 = torch.rand(2, 3, 224, 224)
    assert torch.equal(load_teacher(str(old))(x01), load_teacher(folder)(x01))


@pytest.mark.parametrize("hub", ["dinov2_reg4", "dinov3"])
def test_patch_tokens_of_the_hub_vits_are_what_their_avg_pool_averages(tmp_path, hub):
    from tests.vit_reference import dinov2_file, dinov3_file

    path = str(tmp_path / f"{hub}.pth")
    torch.save(dinov2_file(n_reg=4) if hub == "dinov2_reg4" else dinov3_file(), path)
    x01 = torch.rand(2, 3, 64 if hub == "dinov3" else 56, 48 if hub == "dinov3" else 42)
    tokens = patch_tokens(load_teacher(path), x01)
    patch = 16 if hub == "dinov3" else 14
    assert tokens.shape == (2, x01.shape[2] // patch, x01.shape[3] // patch, 384)
    assert rel(tokens.mean(dim=(1, 2)), load_teacher(path, pool="avg")(x01)) < 1e-5
