"""Every teacher format: a file in the project's published layout (random weights, with its heads,
queues and optimizer state) loads, is detected, and gives the features of a reference network built
here, independently, from the same tensors.

Layouts were checked against the projects' public code (see docs/teachers.md): how each training
script saves and how each evaluation script strips prefixes before loading.
"""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from models.backbones import resolve_teacher_arch
from models.formats import convert, infer_arch
from models.io import CheckpointError, safe_load
from models.resnet_same import byol_resnet50, same_padding
from models.resnet_wide import tf_to_torchvision, wide_resnet50
from models.teachers import load_teacher

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
STAGES = (3, 4, 6, 3)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def randomise_bn(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so that a BN loaded into the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            if m.affine:
                m.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=g))
                m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return net


def tv_state(arch: str = "resnet50", seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return randomise_bn(getattr(torchvision.models, arch)(), seed).state_dict()


def reference(sd: dict, x: torch.Tensor, arch: str = "resnet50", normalise: bool = True) -> torch.Tensor:
    """torchvision's network loaded strictly with the backbone tensors: pooled feature (B, D)."""
    with torch.device("meta"):  # no random init: every tensor comes from ``sd``
        net = getattr(torchvision.models, arch)()
    net.fc = torch.nn.Identity()
    net.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True, assign=True)
    with torch.no_grad():
        return net.eval()((x - MEAN) / STD if normalise else x)


def mlp(*dims: int, bias: bool = True, bn: bool = True, last_bn: bool | None = None) -> torch.nn.Sequential:
    """Linear [BN] ReLU ... Linear [BN(affine=False)], as the SSL projects build their heads."""
    layers = []
    for i in range(len(dims) - 1):
        layers.append(torch.nn.Linear(dims[i], dims[i + 1], bias=bias))
        if i < len(dims) - 2:
            layers += ([torch.nn.BatchNorm1d(dims[i + 1])] if bn else []) + [torch.nn.ReLU()]
    if last_bn is not None:
        layers.append(torch.nn.BatchNorm1d(dims[-1], affine=last_bn))
    return randomise_bn(layers and torch.nn.Sequential(*layers), 7)


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def no_fc(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


OPTIMIZER = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.03, "params": [0]}]}


pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU models: one thread is fastest


@pytest.fixture(scope="module")
def r50() -> dict:
    return tv_state("resnet50", 0)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def save(tmp_path):
    """Write an object as a .pth file; removed after the test (the files are ~100 MB)."""
    paths = []

    def _save(obj, name="ckpt.pth"):
        path = str(tmp_path / name)
        torch.save(obj, path)
        paths.append(path)
        return path

    yield _save
    for p in paths:
        torch.os.remove(p) if torch.os.path.exists(p) else None


# ============ MoCo v1 / v2 (facebookresearch/moco main_moco.py: {epoch, arch, state_dict, optimizer}) ============
def moco_layout(sd: dict, fc: torch.nn.Module) -> dict:
    state = prefixed("module.encoder_q.", {**no_fc(sd), **prefixed("fc.", fc.state_dict())})
    state.update(prefixed("module.encoder_k.", {**no_fc(sd), **prefixed("fc.", fc.state_dict())}))
    state["module.queue"] = F.normalize(torch.randn(128, 16), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": OPTIMIZER}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_moco(version, r50, x, save):
    fc = torch.nn.Linear(2048, 128) if version == "v1" else mlp(2048, 2048, 128, bn=False)
    path = save(moco_layout(r50, fc))
    teacher = load_teacher(path)
    assert (teacher.fmt, teacher.arch, teacher.feat_dim) == ("moco", "resnet50", 2048)
    close(teacher(x), reference(r50, x))
    proj = load_teacher(path, use_fc=True)
    assert proj.feat_dim == 128
    with torch.no_grad():
        close(proj(x), fc.eval()(reference(r50, x)))


# ============ MoCo v3 (facebookresearch/moco-v3: base_encoder.fc projector, momentum_encoder, predictor) ============
def test_mocov3(r50, x, save):
    projector = mlp(2048, 64, 32, bias=False, last_bn=False)  # _build_mlp(2, 2048, mlp_dim, dim)
    predictor = mlp(32, 64, 32, bias=False, last_bn=False)
    state = prefixed("module.base_encoder.", {**no_fc(r50), **prefixed("fc.", projector.state_dict())})
    state.update(prefixed("module.momentum_encoder.", {**no_fc(r50), **prefixed("fc.", projector.state_dict())}))
    state.update(prefixed("module.predictor.", predictor.state_dict()))
    path = save({"epoch": 300, "arch": "resnet50", "state_dict": state, "optimizer": OPTIMIZER, "scaler": {}})
    teacher = load_teacher(path)
    assert teacher.fmt == "mocov3"
    close(teacher(x), reference(r50, x))
    with torch.no_grad():
        close(load_teacher(path, use_fc=True)(x), projector.eval()(reference(r50, x)))


# ============ SimSiam (facebookresearch/simsiam: encoder.fc 3-layer projector, predictor) ============
def test_simsiam(r50, x, save):
    projector = mlp(2048, 2048, 2048, 64, bias=False, last_bn=False)
    projector[6] = torch.nn.Linear(2048, 64)  # the original fc keeps its bias (frozen at its init)
    predictor = mlp(64, 16, 64, bias=False)
    state = prefixed("module.encoder.", {**no_fc(r50), **prefixed("fc.", projector.state_dict())})
    state.update(prefixed("module.predictor.", predictor.state_dict()))
    path = save({"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": OPTIMIZER})
    teacher = load_teacher(path)
    assert teacher.fmt == "simsiam"
    close(teacher(x), reference(r50, x))
    with torch.no_grad():
        close(load_teacher(path, use_fc=True)(x), projector.eval()(reference(r50, x)))


# ============ SwAV (facebookresearch/swav: a raw "module." state dict with projection_head, prototypes) ============
def test_swav(r50, x, save):
    head = mlp(2048, 64, 16)  # Linear, BN, ReLU, Linear (hidden_mlp, feat_dim)
    state = prefixed("module.", {**no_fc(r50), **prefixed("projection_head.", head.state_dict())})
    state["module.prototypes.weight"] = torch.randn(30, 16)
    teacher = load_teacher(save(state))
    assert teacher.fmt == "swav"
    close(teacher(x), reference(r50, x))
    with torch.no_grad():
        close(load_teacher(save(state), use_fc=True)(x), head.eval()(reference(r50, x)))


# ============ DINO (facebookresearch/dino: full checkpoint {student, teacher, ...}; or the backbone file) ============
def test_dino_full_checkpoint_reads_the_teacher(r50, x, save):
    student = tv_state("resnet50", 3)
    head = {"mlp.0.weight": torch.randn(32, 2048), "mlp.0.bias": torch.randn(32)}
    head.update({"last_layer.weight_g": torch.ones(9, 1), "last_layer.weight_v": torch.randn(9, 32)})
    ckpt = {
        "student": prefixed("module.", {**prefixed("backbone.", no_fc(student)), **prefixed("head.", head)}),
        "teacher": prefixed("module.", {**prefixed("backbone.", no_fc(r50)), **prefixed("head.", head)}),
        "optimizer": OPTIMIZER,
        "epoch": 800,
        "args": argparse.Namespace(arch="resnet50", out_dim=9),
        "dino_loss": {"center": torch.zeros(1, 9)},
    }
    teacher = load_teacher(save(ckpt))
    assert teacher.fmt == "dino"
    close(teacher(x), reference(r50, x))
    with pytest.raises(CheckpointError, match="no projection head"):
        load_teacher(save(ckpt), use_fc=True)


@pytest.mark.parametrize("fmt", ["dino", "barlowtwins", "vicreg"])
def test_backbone_only_releases_need_the_flag_or_load_as_torchvision(fmt, r50, x, save):
    path = save(no_fc(r50))  # torch.save(model.module.backbone.state_dict(), ".../resnet50.pth")
    assert load_teacher(path).fmt == "torchvision"  # same network and preprocessing
    teacher = load_teacher(path, fmt=fmt)
    assert teacher.fmt == fmt and teacher.input_norm == "imagenet"
    close(teacher(x), reference(r50, x))


# ============ Barlow Twins / VICReg (facebookresearch: checkpoint {epoch, model, optimizer}) ============
@pytest.mark.parametrize("fmt", ["barlowtwins", "vicreg"])
def test_backbone_projector_checkpoints(fmt, r50, x, save):
    projector = mlp(2048, 64, 64, 64, bias=fmt == "vicreg")
    projector[-1] = torch.nn.Linear(64, 64, bias=False)
    model = {**prefixed("backbone.", no_fc(r50)), **prefixed("projector.", projector.state_dict())}
    if fmt == "barlowtwins":
        model.update(prefixed("bn.", torch.nn.BatchNorm1d(64, affine=False).state_dict()))
    path = save({"epoch": 1000, "model": prefixed("module.", model), "optimizer": OPTIMIZER})
    teacher = load_teacher(path)
    assert teacher.fmt == fmt
    close(teacher(x), reference(r50, x))
    with torch.no_grad():
        close(load_teacher(path, use_fc=True)(x), projector.eval()(reference(r50, x)))


# ============ supervised torchvision, and this project's exported backbones ============
def test_torchvision_supervised_and_its_classifier(r50, x, save):
    path = save(r50)
    teacher = load_teacher(path, arch="sup_resnet50")  # the original's name for it
    assert (teacher.fmt, teacher.arch) == ("torchvision", "resnet50")
    close(teacher(x), reference(r50, x))
    logits = F.linear(reference(r50, x), r50["fc.weight"], r50["fc.bias"])
    close(load_teacher(path, use_fc=True)(x), logits)


# ============ SimCLR v1 converted from TensorFlow ============
def tf_simclr_state(width: int, seed: int = 0, materialise: bool = True) -> dict:
    """Random weights under SimCLR's TensorFlow names: stem, then per stage the shortcut first."""
    g = torch.Generator().manual_seed(seed)
    new = (lambda *s: torch.randn(*s, generator=g) * math.sqrt(2 / math.prod(s[1:]))) if materialise else None
    sd, n, cin = {}, 0, 3

    def add(cout, cin, k):
        nonlocal n
        name = f"_{n}" if n else ""
        shape = (cout, cin, k, k)
        sd[f"conv2d{name}.weight"] = new(*shape) if materialise else torch.zeros(()).expand(shape)
        for p, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            t = torch.full((cout,), v) + (0.1 * torch.randn(cout, generator=g) if materialise else 0)
            sd[f"batch_normalization{name}.{p}"] = t.abs() if p == "running_var" else t
        n += 1

    add(64 * width, 3, 7)
    cin = 64 * width
    for i, blocks in enumerate(STAGES):
        planes = 64 * width * 2**i
        for b in range(blocks):
            if b == 0:
                add(planes * 4, cin, 1)
            add(planes, cin if b == 0 else planes * 4, 1)
            add(planes, planes, 3)
            add(planes * 4, planes, 1)
        cin = planes * 4
    sd["fc.weight"] = torch.randn(10, cin, generator=g) if materialise else torch.zeros(()).expand(10, cin)
    sd["fc.bias"] = torch.zeros(10)
    return sd


def tf_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """SimCLR's TF graph written out layer by layer on the TF names (no mean/std): (B, 2048 * width)."""
    n = 0

    def conv_bn(t, stride=1, relu=True):
        nonlocal n
        name = f"_{n}" if n else ""
        w = sd[f"conv2d{name}.weight"]
        t = F.conv2d(t, w, stride=stride, padding=w.shape[-1] // 2)
        bn = [sd[f"batch_normalization{name}.{p}"] for p in ("running_mean", "running_var", "weight", "bias")]
        t = F.batch_norm(t, *bn, training=False, eps=1e-5)
        n += 1
        return F.relu(t) if relu else t

    with torch.no_grad():
        t = F.max_pool2d(conv_bn(x, stride=2), 3, 2, 1)
        for i, blocks in enumerate(STAGES):
            for b in range(blocks):
                stride = 2 if i > 0 and b == 0 else 1
                shortcut = conv_bn(t, stride, relu=False) if b == 0 else t
                y = conv_bn(conv_bn(t), stride)
                t = F.relu(conv_bn(y, relu=False) + shortcut)
        return t.mean((2, 3))


def test_simclr_tf_names_map_to_the_right_modules(x, save):
    sd = tf_simclr_state(1)
    path = save({"state_dict": sd})
    teacher = load_teacher(path)
    assert (teacher.fmt, teacher.arch, teacher.input_norm, teacher.feat_dim) == ("simclr", "resnet50x1", "none", 2048)
    close(teacher(x), tf_reference(sd, x))  # [0, 1] input: no mean/std anywhere
    close(load_teacher(path, use_fc=True)(x), F.linear(tf_reference(sd, x), sd["fc.weight"], sd["fc.bias"]))


@pytest.mark.parametrize("width", [2, 4])
def test_simclr_widths_are_inferred_from_shapes(width):
    sd = tf_simclr_state(width, materialise=False)  # expanded zeros: the shapes without the memory
    fmt, conv = convert({"state_dict": sd}, "auto", "x4.pth")
    assert fmt == "simclr" and not conv.unknown and conv.input_norm == "none"
    found = infer_arch(conv.backbone)
    assert found == f"resnet50x{width}"
    assert resolve_teacher_arch(None, found, "x4.pth", "simclr") == f"resnet50x{width}"
    with torch.device("meta"):
        net = wide_resnet50(width)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert own == {k: tuple(v.shape) for k, v in conv.backbone.items()}
    assert net.feat_dim == 2048 * width


def test_tf_table_covers_52_layers_shortcut_first():
    table = tf_to_torchvision()
    assert len(table) == 2 * 53
    assert table["conv2d"] == "conv1" and table["batch_normalization"] == "bn1"
    assert table["conv2d_1"] == "layer1.0.downsample.0" and table["conv2d_2"] == "layer1.0.conv1"
    assert table["conv2d_11"] == "layer2.0.downsample.0" and table["conv2d_24"] == "layer3.0.downsample.0"
    assert table["conv2d_43"] == "layer4.0.downsample.0" and table["batch_normalization_52"] == "layer4.2.bn3"


def test_simclr_with_torchvision_names_needs_the_flag(r50, x, save):
    path = save({"state_dict": r50})  # tonylins/simclr-converter: {'state_dict': <torchvision names>}
    for kwargs in ({"arch": "resnet50x1"}, {"fmt": "simclr"}):
        teacher = load_teacher(path, **kwargs)
        assert (teacher.fmt, teacher.arch, teacher.input_norm) == ("simclr", "resnet50x1", "none")
        close(teacher(x), reference(r50, x, normalise=False))


# ============ BYOL converted from JAX (ajtejankar/byol-convert: a raw state dict, no num_batches_tracked) ============
def same_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """ResNet-50 forward that pads every convolution and the max-pool explicitly with F.pad ("SAME")."""

    def pad(t, k, s):
        def split(n):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            return total // 2, total - total // 2

        (top, bottom), (left, right) = split(t.shape[-2]), split(t.shape[-1])
        return F.pad(t, (left, right, top, bottom))

    def conv_bn(t, name, stride=1, relu=True):
        w = sd[f"{name[0]}.weight"]
        t = F.conv2d(pad(t, w.shape[-1], stride), w, stride=stride)
        bn = [sd[f"{name[1]}.{p}"] for p in ("running_mean", "running_var", "weight", "bias")]
        t = F.batch_norm(t, *bn, training=False, eps=1e-5)
        return F.relu(t) if relu else t

    with torch.no_grad():
        t = conv_bn((x - MEAN) / STD, ("conv1", "bn1"), 2)
        t = F.max_pool2d(pad(t, 3, 2), 3, 2)  # zero padding is exact here: inputs are >= 0 after ReLU
        for i, blocks in enumerate(STAGES):
            for b in range(blocks):
                p, stride = f"layer{i + 1}.{b}", 2 if i > 0 and b == 0 else 1
                short = conv_bn(t, (f"{p}.downsample.0", f"{p}.downsample.1"), stride, False) if b == 0 else t
                y = conv_bn(t, (f"{p}.conv1", f"{p}.bn1"))
                y = conv_bn(y, (f"{p}.conv2", f"{p}.bn2"), stride)
                t = F.relu(conv_bn(y, (f"{p}.conv3", f"{p}.bn3"), relu=False) + short)
        return t.mean((2, 3))


def test_same_padding_is_tensorflows():
    assert same_padding(224, 7, 2) == (2, 3)  # TensorFlow pads 2 top/left, 3 bottom/right
    assert same_padding(112, 3, 2) == (0, 1) and same_padding(7, 3, 2) == (1, 1) and same_padding(8, 1, 2) == (0, 0)


@pytest.mark.parametrize("size", [32, 33])
def test_same_padding_network_equals_explicit_f_pad(r50, size):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    net = byol_resnet50()
    net.load_state_dict(no_fc(r50))
    with torch.no_grad():
        out = net.eval()((x - MEAN) / STD)
    close(out, same_reference(r50, x))
    # Odd sizes pad symmetrically at every stride-2 layer, even sizes do not: only then PyTorch's differs.
    assert torch.allclose(out, reference(r50, x), rtol=1e-4, atol=1e-3) == (size % 2 == 1)


def test_byol(r50, x, save):
    sd = {k: v for k, v in r50.items() if not k.endswith("num_batches_tracked")}
    path = save(sd)
    teacher = load_teacher(path, arch="byol_resnet50")
    assert (teacher.fmt, teacher.arch, teacher.input_norm) == ("byol", "byol_resnet50", "imagenet")
    close(teacher(x), same_reference(r50, x))
    assert load_teacher(path, fmt="byol").arch == "byol_resnet50"
    with pytest.raises(CheckpointError, match="SAME"):
        load_teacher(path, arch="resnet50", fmt="byol")


# ============ SimReg students as teachers ============
def test_simreg_checkpoint_and_exported_backbone(x, save):
    from models.simreg import Student

    student = Student("resnet18", 64, 4)
    randomise_bn(student, 5)
    sd = student.backbone_state_dict()
    ckpt = {
        "version": 1,
        "epoch": 3,
        "args": {"arch_student": "resnet18", "n_mlp_layers": 4},
        "student": sd,
        "head": student.head.state_dict(),
        "optimizer": OPTIMIZER,
        "rng": {"torch": torch.get_rng_state()},
    }
    teacher = load_teacher(save(ckpt))
    assert (teacher.fmt, teacher.arch, teacher.feat_dim) == ("simreg", "resnet18", 512)
    close(teacher(x), reference(sd, x, "resnet18"))
    with torch.no_grad():
        close(load_teacher(save(ckpt), use_fc=True)(x), student.eval()(x))  # the head, paper indices
    exported = load_teacher(save(sd, "student_backbone.pth"))
    assert exported.fmt == "torchvision"
    close(exported(x), reference(sd, x, "resnet18"))


def test_authors_released_student(x, save):
    sd = tv_state("resnet18", 4)
    head = mlp(512, 1024, 512, bias=True)
    state = prefixed("encoder_q.module.", no_fc(sd))
    state.update({f"predict_q.module.{k}": v for k, v in head.state_dict().items()})
    state.update(prefixed("encoder_t.module.", no_fc(tv_state("resnet18", 9))))
    ckpt = {"opt": argparse.Namespace(arch_student="resnet18"), "state_dict": state, "optimizer": {}, "epoch": 130}
    teacher = load_teacher(save(ckpt))
    assert (teacher.fmt, teacher.arch) == ("simreg_original", "resnet18")
    close(teacher(x), reference(sd, x, "resnet18"))


# ============ nothing loads silently ============
def test_missing_backbone_key_is_named(r50, save):
    ckpt = moco_layout(r50, torch.nn.Linear(2048, 128))
    del ckpt["state_dict"]["module.encoder_q.layer3.1.bn2.running_var"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): layer3\.1\.bn2\.running_var"):
        load_teacher(save(ckpt))


def test_unknown_keys_and_shape_mismatch_are_named(r50, save):
    ckpt = moco_layout(r50, torch.nn.Linear(2048, 128))
    ckpt["state_dict"]["module.encoder_q.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): extra\.weight"):
        load_teacher(save(ckpt))
    ckpt = moco_layout(r50, torch.nn.Linear(2048, 128))
    ckpt["state_dict"]["module.stray.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unrecognised key\(s\): stray\.weight"):
        load_teacher(save(ckpt))
    ckpt = moco_layout(r50, torch.nn.Linear(2048, 128))
    ckpt["state_dict"]["module.encoder_q.layer1.0.conv1.weight"] = torch.zeros(32, 64, 1, 1)
    with pytest.raises(CheckpointError, match=r"layer1\.0\.conv1\.weight \(32, 64, 1, 1\) vs \(64, 64, 1, 1\)"):
        load_teacher(save(ckpt))
    with pytest.raises(CheckpointError, match="holds a resnet50, but --arch_teacher is resnet18"):
        load_teacher(save(r50), arch="resnet18")


def test_unknown_layout_lists_what_it_resembles(r50, save):
    ckpt = {"state_dict": {"q_encoder.conv1.weight": torch.zeros(1), "queue": torch.zeros(1)}}
    with pytest.raises(CheckpointError, match="could not recognise the layout.*it resembles moco: try --teacher_fo"):
        load_teacher(save(ckpt))
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'mocov9'"):
        load_teacher(save(r50), fmt="mocov9")


def test_corrupt_and_truncated_files_fail_clearly(r50, tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_teacher(str(bad))
    good = tmp_path / "r18.pth"
    torch.save(tv_state("resnet18"), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint, perhaps cut short or damaged \("):
        safe_load(str(cut), "teacher")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(str(tmp_path / "nope.pth"))


def test_teacher_stays_frozen_in_eval(r50, x, save, caplog):
    with caplog.at_level(logging.INFO):
        teacher = load_teacher(save(moco_layout(r50, torch.nn.Linear(2048, 128))))
    assert "encoder_k.* (320 keys), queue, queue_ptr, encoder_q.fc.* (2 keys)" in caplog.text
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    close(teacher(x), reference(r50, x))
