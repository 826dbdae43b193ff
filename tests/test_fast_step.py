"""The fast training step computes the same thing: numerics of bf16 / channels_last / inference mode,
BatchNorm folding, the fused optimizer, and the benchmark's original-recipe baseline."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torchvision

import train_student
from models.backbones import build_encoder
from models.fold import compile_frozen, count_batchnorms, fold_batchnorm
from models.simreg import Student, regression_loss
from models.teachers import Teacher
from tools.bench.baseline import OriginalStep, build_original_pair, normalised_pair
from tools.engine.distributed import DistInfo
from tools.engine.step import StepConfig, build_optimizer, distill_step

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU models: one thread is fastest


HP0 = SimpleNamespace(learning_rate=0.0, sgd_momentum=0.9, weight_decay=1e-4)  # lr 0: grads stay, weights too


def smooth_batch(b: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 (B, 3, S, S) images with structure (upsampled noise), not white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 8, size // 8, generator=g)
    return (torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 255).round().to(torch.uint8)


def randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def pair_of_models(seed: int = 0) -> tuple[Teacher, Student]:
    torch.manual_seed(seed)
    teacher = Teacher(build_encoder("resnet18"), "resnet18", "random")
    randomise_bn(teacher)
    return teacher, Student("resnet18", teacher.feat_dim)


def step_grads(teacher, student, batch, cfg: StepConfig, train: bool = True) -> tuple[float, torch.Tensor]:
    """Loss and the flattened student gradient of one distill_step (lr 0 keeps the weights)."""
    student.train(train)
    opt = build_optimizer(
        student.parameters(), HP0.learning_rate, HP0.sgd_momentum, HP0.weight_decay, torch.device("cpu")
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = distill_step(student, teacher, batch, torch.arange(batch.shape[0]), opt, scaler, cfg)
    return loss.item(), torch.cat([p.grad.flatten() for p in student.parameters()])


def fp32_and_fast(batch: torch.Tensor, train: bool, seed: int = 0) -> tuple[float, torch.Tensor, float, torch.Tensor]:
    """(loss, grad) of the fp32 NCHW step and of the fast step (bf16 autocast, channels_last) on one batch."""
    teacher, student = pair_of_models(seed)
    cpu = torch.device("cpu")
    loss32, grad32 = step_grads(
        teacher, copy.deepcopy(student), batch, StepConfig(DistInfo(device=cpu), None, False, 100), train
    )
    t_cl = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    s_cl = copy.deepcopy(student).to(memory_format=torch.channels_last)
    loss16, grad16 = step_grads(t_cl, s_cl, batch, StepConfig(DistInfo(device=cpu), torch.bfloat16, True, 100), train)
    return loss32, grad32, loss16, grad16


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_fast_step_matches_fp32_step():
    """The issue's bar: loss within 1e-2 relative, gradient cosine > 0.99 (measured: ~1e-4 and 0.9999).

    The student's BatchNorms use running statistics here: with batch statistics of 16 random-init
    features the fp32 gradient itself is chaotic (see the next test), which would measure that, not bf16.
    """
    loss32, grad32, loss16, grad16 = fp32_and_fast(smooth_batch(16, 48), train=False)
    assert abs(loss16 - loss32) / loss32 < 1e-2
    assert cosine(grad16, grad32) > 0.99
    assert not torch.equal(grad16, grad32)  # bf16 really ran


@pytest.mark.slow
def test_fast_step_in_train_mode_is_within_the_fp32_noise():
    """With train-mode BatchNorm at initialisation, changing input pixels by +-1 level moves the fp32
    gradient to a cosine of ~0.7; bf16 moves it less than that (measured ~0.85), and the loss stays close."""
    batch = smooth_batch(16, 48)
    loss32, grad32, loss16, grad16 = fp32_and_fast(batch, train=True)
    g = torch.Generator().manual_seed(9)
    nudged = (batch.int() + torch.randint(-1, 2, batch.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    teacher, student = pair_of_models(0)
    _, grad_nudged = step_grads(
        teacher, student, nudged, StepConfig(DistInfo(device=torch.device("cpu")), None, False, 100)
    )
    assert abs(loss16 - loss32) / loss32 < 1e-2
    assert cosine(grad16, grad32) > cosine(grad_nudged, grad32)


def test_inference_mode_teacher_keeps_the_maths_and_backward_works():
    teacher, student = pair_of_models(1)
    batch = smooth_batch(8, 32, seed=1)
    x = batch.float() / 255
    want = regression_loss(copy.deepcopy(student).train()(x), teacher(x)).item()
    loss, grad = step_grads(teacher, student, batch, StepConfig(DistInfo(device=torch.device("cpu")), None, False, 100))
    assert loss == pytest.approx(want, rel=1e-6)
    assert grad.abs().sum() > 0


def test_original_recipe_baseline_computes_the_same_loss():
    """Shuffle/unshuffle of an eval teacher, normalisation in the loader: the same maths as ours."""
    torch.manual_seed(2)
    o_teacher, o_student = build_original_pair("resnet18", "resnet18", torch.device("cpu"))
    randomise_bn(o_teacher)
    teacher = Teacher(build_encoder("resnet18"), "resnet18", "random")
    teacher.encoder.backbone.load_state_dict(o_teacher.encoder.backbone.state_dict())
    student = Student("resnet18", 512)
    student.encoder.backbone.load_state_dict(o_student.encoder.backbone.state_dict())
    student.head.load_state_dict(o_student.head.state_dict())
    batch = smooth_batch(8, 32, seed=2)
    ours, _ = step_grads(teacher, student, batch, StepConfig(DistInfo(device=torch.device("cpu")), None, False, 100))
    original = OriginalStep(o_teacher, o_student, torch.device("cpu"))(*normalised_pair(batch))
    assert original == pytest.approx(ours, rel=1e-5)


def test_pair_views_step():
    teacher, student = pair_of_models(3)
    views = (smooth_batch(4, 32, seed=3), smooth_batch(4, 32, seed=4))
    opt = build_optimizer(
        student.parameters(), HP0.learning_rate, HP0.sgd_momentum, HP0.weight_decay, torch.device("cpu")
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = distill_step(
        student,
        teacher,
        views,
        torch.arange(4),
        opt,
        scaler,
        StepConfig(DistInfo(device=torch.device("cpu")), None, False, 1),
    )
    x_s, x_t = views[0].float() / 255, views[1].float() / 255
    assert loss.item() == pytest.approx(regression_loss(copy.deepcopy(student)(x_s), teacher(x_t)).item(), rel=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_fold_batchnorm_keeps_the_features(arch):
    torch.manual_seed(0)
    enc = build_encoder(arch)
    randomise_bn(enc)
    enc.eval()
    folded = fold_batchnorm(enc)
    assert count_batchnorms(folded) == 0 and count_batchnorms(enc) > 0  # the input is left untouched
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        want, got = enc(x), folded(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_fold_batchnorm_refuses_train_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_encoder("resnet18").train())


def test_compiled_frozen_teacher_gives_the_same_features():
    teacher, _ = pair_of_models(4)
    x = torch.rand(2, 3, 32, 32)
    want = teacher(x)
    teacher.encoder = compile_frozen(teacher.encoder, backend="eager")
    with torch.inference_mode():
        got = teacher.targets(x, torch.arange(2))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fused_sgd_on_cpu_equals_the_plain_update():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = copy.deepcopy(a)
    hp = SimpleNamespace(learning_rate=0.1, sgd_momentum=0.9, weight_decay=1e-4)
    fused = build_optimizer(a.parameters(), hp.learning_rate, hp.sgd_momentum, hp.weight_decay, torch.device("cpu"))
    plain = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False)
    assert fused.param_groups[0]["fused"] is True
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.slow
def test_training_runs_with_the_fast_options(tmp_path):
    """train_student.py end to end on JPEGs: fast decoding, bf16 on CPU, channels_last, fused SGD, against
    the same run on the reference path (PIL decoding, fp32, NCHW): the same epoch loss within bf16's noise."""
    from data.synthetic import make_jpeg_folder

    make_jpeg_folder(str(tmp_path / "data"), 16, n_classes=2, size=(64, 48))
    weights = tmp_path / "teacher.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)

    def run(name: str, *fast: str) -> dict:
        argv = [str(tmp_path / "data"), "--teacher_weights", str(weights), "--arch_student", "resnet18",
                "--image_size", "32", "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--single_aug",
                "--weak_weak", "--exp_dir", str(tmp_path / name), "--device", "cpu", *fast]  # fmt: skip
        return train_student.main(train_student.get_args_parser().parse_args(argv))

    reference = run("reference", "--decode", "pil", "--amp", "none")
    stats = run("fast", "--decode", "auto", "--amp", "bf16", "--channels_last")
    assert stats["epoch"] == 1 and stats["steps"] == reference["steps"] == 2
    assert stats["loss"] == pytest.approx(reference["loss"], rel=0.03)  # same crops, bf16 + decoder rounding
    assert stats["loss"] != reference["loss"]  # the fast options did run: bf16 changes the last digits
    assert (tmp_path / "fast" / "checkpoints" / "student_backbone.pth").exists()


def cuda_steps(compiled: bool) -> tuple[float, torch.Tensor, float, torch.Tensor]:
    """(loss, grad) of an fp32 NCHW step and of the fast step (bf16, channels_last, fused SGD; ``compiled``: the
    BN-folded teacher and the student compiled) on CUDA, the same weights and batch."""
    teacher, student = pair_of_models(5)
    dev = torch.device("cuda")
    teacher, student = teacher.to(dev), student.to(dev)
    batch = smooth_batch(16, 64, seed=5).to(dev)

    def run(t, s, cfg):
        opt = build_optimizer(s.parameters(), HP0.learning_rate, HP0.sgd_momentum, HP0.weight_decay, dev)
        loss = distill_step(s, t, batch, torch.arange(16), opt, torch.amp.GradScaler("cuda", enabled=False), cfg)
        return loss.item(), torch.cat([p.grad.flatten() for p in s.parameters()])

    torch.backends.cudnn.allow_tf32 = False
    loss32, grad32 = run(teacher, copy.deepcopy(student), StepConfig(DistInfo(device=dev), None, False, 100))
    fast_t = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
    fast_s = copy.deepcopy(student).to(memory_format=torch.channels_last)
    if compiled:
        fast_t.encoder = compile_frozen(fast_t.encoder)
        fast_s = torch.compile(fast_s)
    loss16, grad16 = run(fast_t, fast_s, StepConfig(DistInfo(device=dev), torch.bfloat16, True, 100))
    return loss32, grad32, loss16, grad16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_step_on_cuda_matches_fp32():
    """bf16 autocast, channels_last, fused SGD on CUDA vs an fp32 step."""
    loss32, grad32, loss16, grad16 = cuda_steps(compiled=False)
    assert abs(loss16 - loss32) / loss32 < 1e-2
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_fast_step_on_cuda_matches_fp32():
    """The same with the BN-folded teacher and the student compiled (minutes cold: the GPU check's optional part)."""
    loss32, grad32, loss16, grad16 = cuda_steps(compiled=True)
    assert abs(loss16 - loss32) / loss32 < 1e-2
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99
