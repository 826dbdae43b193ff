"""The dense objective's parts: feature maps of every network family, the dense head, the resampling and the
per-location loss, each against an independent computation (per-location global heads, PIL's bilinear
resize, timm's ``forward_intermediates``, plain loops)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from models.backbones import build_encoder
from models.errors import UserError
from models.feature_maps import MapTap, probe_map
from models.simreg import (
    Student,
    build_dense_head,
    build_head,
    dense_loss,
    distillation_losses,
    loss_names,
    objective_losses,
    parameter_layout,
    resample_grid,
)
from models.teachers import TeacherSet, load_teacher
from tests.conftest import write_random_resnet18
from tests.vit_reference import dinov2_file, dinov3_file, mocov3_file, vit_weights

pytestmark = pytest.mark.usefixtures("one_thread")


# ============ the dense head ============
@pytest.mark.parametrize("layers", [4, 2, 0])
def test_dense_head_is_the_global_head_applied_at_every_location(layers):
    """Same layout and parameter indices as the paper's head; with the same weights and BatchNorm statistics
    (eval mode) it maps every location's feature exactly as the global head maps a pooled one."""
    torch.manual_seed(0)
    dense, flat = build_dense_head(6, 5, layers), build_head(6, 5, layers)
    kinds = tuple(
        (i, "linear" if isinstance(m, nn.Conv2d) else "bn") for i, m in enumerate(dense) if len(m.state_dict())
    )
    assert kinds == parameter_layout(layers)
    assert all(m.kernel_size == (1, 1) for m in dense if isinstance(m, nn.Conv2d))
    for m in dense:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    flat.load_state_dict({k: v.reshape(v.shape[:2]) if v.ndim == 4 else v for k, v in dense.state_dict().items()})
    x = torch.randn(3, 6, 4, 5)
    got = dense.eval()(x)  # (3, 5, 4, 5)
    want = flat.eval()(x.permute(0, 2, 3, 1).reshape(-1, 6)).reshape(3, 4, 5, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ============ resampling and the loss ============
def test_targets_are_enlarged_bilinearly_and_shrunk_as_pil_does():
    """Enlarging is plain bilinear (align_corners False); shrinking is antialiased bilinear, which is what
    PIL's Image.resize(BILINEAR) computes (every teacher token weighs in)."""
    torch.manual_seed(0)
    small = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(
        resample_grid(small, (7, 7)), F.interpolate(small, size=(7, 7), mode="bilinear", align_corners=False)
    )
    big = torch.rand(1, 2, 14, 14)
    pil = np.stack([np.asarray(Image.fromarray(big[0, c].numpy(), "F").resize((5, 5), Image.BILINEAR)) for c in (0, 1)])
    torch.testing.assert_close(resample_grid(big, (5, 5))[0], torch.from_numpy(pil), rtol=1e-5, atol=1e-5)
    assert resample_grid(big, (14, 14)) is big


def test_dense_loss_is_two_minus_two_cos_per_location_averaged():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    total = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                p, t = pred[b, :, i, j], target[b, :, i, j]
                total += 2 - 2 * float(p @ t / (p.norm() * t.norm()))
    assert dense_loss(pred, target).item() == pytest.approx(total / 18, rel=1e-6)
    assert dense_loss(pred, 3 * pred).item() == pytest.approx(0.0, abs=1e-6)
    assert dense_loss(pred, -pred).item() == pytest.approx(4.0, abs=1e-6)
    # a teacher grid other than the student's: the targets are resampled to the student's grid
    fine = torch.randn(2, 4, 6, 6)
    assert dense_loss(pred, fine).item() == pytest.approx(dense_loss(pred, resample_grid(fine, (3, 3))).item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense_loss(pred.bfloat16(), fine.bfloat16()).dtype == torch.float32


def test_objective_losses_weigh_teachers_and_terms():
    torch.manual_seed(0)
    preds = {
        "dense": [torch.randn(2, 4, 2, 2), torch.randn(2, 3, 2, 2)],
        "global": [torch.randn(2, 5), torch.randn(2, 6)],
    }
    targets = [{"dense": torch.randn(2, 4, 4, 4), "global": torch.randn(2, 5)},
               {"dense": torch.randn(2, 3, 2, 2), "global": torch.randn(2, 6)}]  # fmt: skip
    d = [dense_loss(p, t["dense"]) for p, t in zip(preds["dense"], targets, strict=True)]
    g = [F.mse_loss(F.normalize(p), F.normalize(t["global"]), reduction="sum") / 2
         for p, t in zip(preds["global"], targets, strict=True)]  # fmt: skip
    out = objective_losses(preds, targets, [0.25, 0.75], dense_weight=0.5)
    assert list(out) == ["loss", "per_teacher", "global", "dense"]
    per = [g[k] + 0.5 * d[k] for k in range(2)]
    torch.testing.assert_close(out["per_teacher"], torch.stack(per))
    torch.testing.assert_close(out["loss"], 0.25 * per[0] + 0.75 * per[1])
    torch.testing.assert_close(out["global"], 0.25 * g[0] + 0.75 * g[1])
    torch.testing.assert_close(out["dense"], 0.25 * d[0] + 0.75 * d[1])
    only = objective_losses({"dense": preds["dense"][:1]}, targets[:1], [1.0], dense_weight=0.5)
    assert list(only) == ["loss"] and torch.equal(only["loss"], d[0])
    assert loss_names(2, "both") == ["loss", "loss_teacher_1", "loss_teacher_2", "loss_global", "loss_dense"]
    assert loss_names(1, "dense") == ["loss"]


# ============ feature maps of every network family ============
@pytest.mark.parametrize(
    ("arch", "kind", "channels"),
    [
        ("resnet18", "pool_input", 512),
        ("mobilenet_v2", "module_output", 1280),
        ("densenet121", "module_output", 1024),
        ("shufflenet_v2_x0_5", "module_output", 1024),
        ("efficientnet_b0", "pool_input", 1280),
        ("timm/resnet10t", "pool_input", 512),
        ("timm/vit_tiny_patch16_224", "vit", 192),
    ],
)
def test_the_map_is_what_the_network_pools(arch, kind, channels):
    """The tap reads the map the global pool averages: its mean over locations is the pooled feature (a ViT
    pools its class token instead; its map is the final-norm patch tokens, compared with timm's own)."""
    torch.manual_seed(0)
    encoder = build_encoder(arch).eval()
    tap = MapTap(encoder.backbone)
    x = torch.rand(2, 3, 64, 64)
    tap.start()
    with torch.no_grad():
        pooled = encoder(x)
        fmap = tap.read()
    assert tap.kind == kind and fmap.shape[:2] == (2, channels)
    if kind == "vit":
        tokens = encoder.backbone.forward_features(encoder.normalize(x))[:, 1:]
        torch.testing.assert_close(fmap, tokens.reshape(2, 4, 4, -1).permute(0, 3, 1, 2))
    else:
        torch.testing.assert_close(fmap.mean(dim=(2, 3)), pooled, rtol=1e-5, atol=1e-6)
    assert probe_map(encoder, tap, encoder, 96)[1:] == ((3, 3) if kind != "vit" else (6, 6))


def test_torchvision_vit_map_is_its_encoder_output_without_the_class_token():
    torch.manual_seed(0)
    net = torchvision.models.vit_b_16(image_size=32).eval()  # 2 x 2 patches
    net.heads = nn.Identity()
    tap = MapTap(net)
    x = torch.randn(1, 3, 32, 32)
    tap.start()
    with torch.no_grad():
        net(x)
        fmap = tap.read()
        tokens = net.encoder(torch.cat([net.class_token, net._process_input(x)], dim=1))
    torch.testing.assert_close(fmap, tokens[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2))


def test_a_network_without_pooling_and_dense_blocks_on_a_cnn_are_refused():
    with pytest.raises(UserError, match="has no feature map that this project can find"):
        MapTap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), name="toy")
    with pytest.raises(UserError, match="--dense_blocks 2 concatenates a ViT's last blocks; resnet18 is not a ViT"):
        MapTap(build_encoder("resnet18").backbone, blocks=2, name="resnet18")


def test_forwards_outside_a_dense_step_keep_nothing():
    """k-NN monitoring runs the student's encoder between steps: the tap holds no map of those forwards."""
    student = Student("resnet18", 8, 0, "dense", [6], image_size=64)
    with torch.no_grad():
        for _ in range(3):
            student.encoder(torch.rand(2, 3, 64, 64))
    assert student.tap.captured == []
    assert student(torch.rand(2, 3, 64, 64))["dense"][0].shape == (2, 6, 2, 2) and student.tap.captured == []


def test_the_hooks_travel_with_a_deep_copy():
    torch.manual_seed(0)
    student = Student("resnet18", 8, 4, "dense", [6], image_size=64)
    twin = copy.deepcopy(student)
    x = torch.rand(2, 3, 64, 64)
    a, b = student.eval()(x), twin.eval()(x)
    assert twin.tap is not student.tap and twin.tap.net is twin.encoder.backbone
    torch.testing.assert_close(a["dense"][0], b["dense"][0])


# ============ ViT teachers: final-norm patch tokens, registers and class token left out ============
VIT_FILES = {  # a file of each publisher's layout: (raw, class + register tokens, crop size, patch grid)
    "dino": (lambda: vit_weights(patch=8), 1, 32, 4),
    "dinov2_reg4": (lambda: dinov2_file(n_reg=4), 5, 56, 4),
    "dinov3": (dinov3_file, 5, 64, 4),
    "mocov3": (mocov3_file, 1, 64, 4),
}


@pytest.mark.parametrize("case", list(VIT_FILES))
def test_vit_teacher_dense_targets_are_the_final_norm_patch_tokens(tmp_path, case):
    make, n_prefix, size, grid = VIT_FILES[case]
    path = str(tmp_path / "vit.pth")
    torch.save(make(), path)
    teacher = load_teacher(path).use_objective("both", blocks=1, image_size=size)
    assert teacher.dense_grid == (grid, grid)
    x = torch.rand(2, 3, size, size)
    with torch.inference_mode():
        out = teacher.targets(x, None)
        plain = teacher(x)
        net = teacher.encoder.backbone
        tokens = net.forward_features(teacher.encoder.normalize(x))
    assert net.num_prefix_tokens == n_prefix
    assert torch.equal(out["global"], plain)  # the pooled target of the same forward, unchanged
    torch.testing.assert_close(out["dense"], tokens[:, n_prefix:].reshape(2, grid, grid, -1).permute(0, 3, 1, 2))


def test_dense_blocks_concatenate_the_last_blocks_normalised(tmp_path):
    """--dense_blocks 2 against timm's forward_intermediates(norm=True) on the same network."""
    path = str(tmp_path / "dinov2.pth")
    torch.save(dinov2_file(), path)
    teacher = load_teacher(path).use_objective("dense", blocks=2, image_size=56)
    x = torch.rand(1, 3, 56, 56)
    with torch.inference_mode():
        got = teacher.targets(x, None)["dense"]
        want = teacher.encoder.backbone.forward_intermediates(
            teacher.encoder.normalize(x), indices=2, norm=True, intermediates_only=True
        )
    assert got.shape == (1, 2 * 384, 4, 4)
    torch.testing.assert_close(got, torch.cat(want, dim=1))
    with pytest.raises(UserError, match="--dense_blocks 3: teacher vit_s14_depth2 has 2 blocks"):
        load_teacher(path).use_objective("dense", blocks=3, image_size=56)


def test_cnn_teachers_live_and_in_a_set(tmp_path):
    r18 = write_random_resnet18(tmp_path / "r18.pth")
    timm_file = str(tmp_path / "r10t.pth")
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet10t").state_dict(), timm_file)
    a = load_teacher(r18).use_objective("dense", image_size=64)
    b = load_teacher(timm_file, "timm/resnet10t").use_objective("dense", image_size=64)
    group = TeacherSet([a, b])
    assert group.dense_dims == [512, 512] and a.dense_grid == b.dense_grid == (2, 2)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        out = group.targets(x, None)
        plain = a(x)
    assert [list(t) for t in out] == [["dense"], ["dense"]]
    torch.testing.assert_close(out[0]["dense"].mean(dim=(2, 3)), plain)  # ResNet: the map its pool averages


# ============ the student and one step ============
def test_dense_student_step_and_frozen_parts_after_the_map():
    """--loss dense: no global head, one dense head per teacher; layers that only act after the map (VGG's
    fc6/fc7) get no gradient and are frozen (DDP would otherwise wait for their gradients)."""
    torch.manual_seed(0)
    student = Student("resnet18", [8, 9], 2, "dense", [6, 7], image_size=64)
    assert len(student.heads) == 0 and [h[-1].out_channels for h in student.dense_heads] == [6, 7]
    assert all(p.requires_grad for p in student.parameters())
    vgg = Student("vgg11", 8, 0, "dense", [6], image_size=64)
    frozen = {n for n, p in vgg.encoder.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"}
    assert all(p.requires_grad for p in Student("vgg11", 8, 0, "both", [6], image_size=64).parameters())


class _DenseToyTeacher:
    weights = [0.5, 0.5]

    def weight_tensor(self, device, dtype=torch.float32):
        return torch.tensor(self.weights, dtype=dtype, device=device)

    def targets(self, images, index):
        pooled = images.mean(dim=(2, 3))
        return [{"dense": images[:, :2], "global": pooled.repeat(1, 3)}, {"dense": images, "global": pooled}]


def test_distillation_losses_of_a_both_student():
    torch.manual_seed(0)
    student = Student("resnet18", [9, 3], 0, "both", [2, 3], image_size=64)
    x = torch.rand(4, 3, 64, 64)
    losses = distillation_losses(student, _DenseToyTeacher(), x, x, torch.arange(4), dense_weight=2.0)
    assert list(losses) == ["loss", "per_teacher", "global", "dense"]
    torch.testing.assert_close(losses["loss"], losses["global"] + 2.0 * losses["dense"])
    losses["loss"].backward()
    assert student.dense_heads[1][-1].weight.grad is not None and student.heads[0][-1].weight.grad is not None


def test_compiled_dense_student_equals_eager():
    torch.manual_seed(0)
    student = Student("resnet18", 8, 0, "both", [6], image_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    eager = student(x)
    compiled = torch.compile(student, backend="aot_eager")(x)
    torch.testing.assert_close(compiled["dense"][0], eager["dense"][0])
    torch.testing.assert_close(compiled["global"][0], eager["global"][0])


# ============ Hugging Face teachers: the patch tokens their publishers give ============
@pytest.fixture(scope="module")
def hf_snapshots(tmp_path_factory) -> dict:
    from tests.hf_reference import build, write_snapshot

    root = tmp_path_factory.mktemp("hf_dense")
    return {case: write_snapshot(build(case), str(root / case)) for case in HF_CASES}


HF_CASES = ("dinov2_registers", "dinov3", "clip", "siglip", "vit", "dinov3_convnext")


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_teacher_dense_targets_are_its_patch_tokens(hf_snapshots, case):
    """Registers and class token left out, the final norm applied (DINOv3 ConvNeXt: its LayerNorm per location):
    models.hf_networks.patch_tokens, which is checked against transformers' last_hidden_state."""
    from models.hf_networks import patch_tokens

    teacher = load_teacher(hf_snapshots[case])
    stride = 32 if case == "dinov3_convnext" else teacher.encoder.backbone.patch
    size = 4 * stride
    teacher.use_objective("both", image_size=size)
    x = torch.rand(2, 3, size, size)
    with torch.inference_mode():
        got = teacher.targets(x, None)
        want = patch_tokens(teacher, x).permute(0, 3, 1, 2)
        plain = teacher(x)
    assert teacher.dense_grid == (4, 4) and got["dense"].shape == want.shape
    torch.testing.assert_close(got["dense"], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["global"], plain)
