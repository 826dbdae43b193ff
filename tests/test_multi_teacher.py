"""Several teachers at once: one head per teacher on one backbone, the loss the weighted mean of theirs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

import train_student
from data.datasets import IndexedImageFolder, dataset_fingerprint
from data.loaders import build_loader
from data.transforms import CenterCrop, TrainViews
from models.errors import UserError
from models.pretrained import load_eval_model
from models.simreg import Student, distillation_losses, multi_teacher_loss, regression_loss
from models.teachers import TeacherSet, load_teacher
from tools.engine.distributed import DistInfo
from tools.engine.step import StepConfig, build_optimizer, distill_step
from tools.teacher_cache.builder import build_cache

pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU models: one thread is fastest


def test_loss_is_the_weighted_mean_of_the_per_teacher_losses():
    # teacher 1: cosines 1 and 0 -> losses 0 and 2 -> mean 1; teacher 2: cosines -1 and 1 -> 4 and 0 -> 2
    preds = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])]
    targets = [torch.tensor([[3.0, 0.0], [1.0, 0.0]]), torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])]
    out = multi_teacher_loss(preds, targets, [0.25, 0.75])
    assert out.dtype == torch.float32 and out.tolist() == [0.25 * 1.0 + 0.75 * 2.0, 1.0, 2.0]
    assert TeacherSet([LinearTeacher(2, 0), LinearTeacher(3, 1)], [1.0, 3.0]).weights == [0.25, 0.75]  # sum 1


def test_the_step_reuses_one_weight_tensor(monkeypatch):
    """The weights reach the device once, not every step (a list copied per step waits for the queued work)."""
    group = TeacherSet([LinearTeacher(2, 0), LinearTeacher(3, 1)], [1.0, 3.0])
    w = group.weight_tensor(torch.device("cpu"))
    assert w.tolist() == [0.25, 0.75] and group.weight_tensor(torch.device("cpu")) is w
    assert group.weight_tensor(torch.device("cpu"), torch.float64).dtype == torch.float64
    preds = [torch.randn(4, 2), torch.randn(4, 3)]
    targets = [torch.randn(4, 2), torch.randn(4, 3)]
    assert torch.equal(multi_teacher_loss(preds, targets, w), multi_teacher_loss(preds, targets, [0.25, 0.75]))
    student = Student("resnet18", [2, 3], n_mlp_layers=0)
    made = []
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or pytest.fail("a tensor made per step"))
    for _ in range(2):
        losses = distillation_losses(student, group, *[torch.rand(2, 3, 32, 32)] * 2, torch.arange(2))
        assert losses["per_teacher"].shape == (2,)


def test_one_head_per_teacher_of_its_teachers_width():
    torch.manual_seed(0)
    student = Student("resnet18", [64, 96], n_mlp_layers=4)
    outs = student(torch.rand(2, 3, 32, 32))
    assert [o.shape for o in outs] == [(2, 64), (2, 96)]
    assert [h[7].out_features for h in student.heads] == [64, 96] and student.head is student.heads[0]
    assert [h[0].in_features for h in student.heads] == [512, 512]  # both read the same backbone feature


class LinearTeacher(torch.nn.Module):
    """A frozen fixed map of the mean pixel: targets (B, dim)."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(3, dim, generator=torch.Generator().manual_seed(seed)))
        self.feat_dim = dim

    def targets(self, images, indices):
        return images.mean(dim=(2, 3)) @ self.w


def test_backbone_gradient_is_the_weighted_sum_of_the_per_teacher_gradients():
    torch.manual_seed(0)
    student = Student("resnet18", [6, 9], n_mlp_layers=2)
    teachers = TeacherSet([LinearTeacher(6, 1), LinearTeacher(9, 2)], [2.0, 1.0])
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    opt = build_optimizer(student.parameters(), 0.0, 0.9, 1e-4, torch.device("cpu"))  # lr 0: weights stay
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = StepConfig(DistInfo(), None, False, print_freq=100)
    loss = distill_step(student, teachers, batch, torch.arange(4), opt, scaler, cfg)
    grad = torch.cat([p.grad.flatten() for p in student.encoder.parameters()])
    x = batch.float() / 255
    per_teacher = []
    for head, t in zip(student.heads, teachers.teachers, strict=True):
        student.zero_grad()
        regression_loss(head(student.encoder(x)), t.targets(x, None)).backward()
        per_teacher.append(torch.cat([p.grad.flatten() for p in student.encoder.parameters()]))
    expected = (2 / 3) * per_teacher[0] + (1 / 3) * per_teacher[1]
    # float32 sums in another order: equal up to a few 1e-6 of the largest gradient
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not torch.allclose(grad, per_teacher[0], rtol=1e-2)  # both teachers count
    assert loss.shape == (3,) and loss[0].item() == pytest.approx((2 * loss[1] + loss[2]).item() / 3, rel=1e-6)


# ============ through train_student.py ============
@pytest.fixture
def two_teachers(tmp_path) -> tuple[str, str]:
    """Two random ResNet-18s in torchvision's layout (the second read through its 1000-class fc)."""
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        files.append(str(tmp_path / f"teacher{seed}.pth"))
        torch.save(torchvision.models.resnet18().state_dict(), files[-1])
    return files[0], files[1]


def argv_for(data, exp, epochs, *teacher_flags, extra=()):
    return [data, "--arch_student", "resnet18", "--image_size", "32", "--batch_size", "4", "--epochs", str(epochs),
            "--num_workers", "0", "--device", "cpu", "--single_aug", "--weak_weak", "--exp_dir", exp,
            *extra, *teacher_flags]  # fmt: skip


def run(argv):
    return train_student.main(train_student.get_args_parser().parse_args(argv))


def latest(exp):
    return torch.load(os.path.join(exp, "checkpoints", "checkpoint_latest.pth"), weights_only=True)


@pytest.mark.slow
def test_two_teachers_resume_exactly_and_log_each_loss(tiny_data, two_teachers, tmp_path):
    flags = ["--teacher_weights", *two_teachers, "--teacher_fc", "no", "yes", "--teacher_loss_weights", "3", "1"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run(argv_for(tiny_data, straight, 2, *flags))
    run(argv_for(tiny_data, split, 1, *flags))
    run(argv_for(tiny_data, split, 2, *flags))  # resumes from the latest
    a, b = latest(straight), latest(split)
    assert [h["7.weight"].shape[0] for h in a["heads"]] == [512, 1000]  # pooled feature; fc logits
    assert all(torch.equal(a["head"][k], a["heads"][0][k]) for k in a["head"])  # head: the first teacher's
    for part in ("student", "head"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for ha, hb in zip(a["heads"], b["heads"], strict=True):
        assert all(torch.equal(ha[k], hb[k]) for k in ha)
    lines = [json.loads(ln) for ln in open(os.path.join(split, "logs", "train_log.jsonl"))]
    for line in lines:
        assert line["loss"] == pytest.approx(0.75 * line["loss_teacher_1"] + 0.25 * line["loss_teacher_2"], rel=1e-6)
    assert a["identity"]["teacher_loss_weights"] == [0.75, 0.25] and len(a["identity"]["teacher"]) == 2
    # another teacher list is another run
    with pytest.raises(UserError, match="belongs to a different run.*teacher"):
        run(argv_for(tiny_data, split, 3, "--teacher_weights", *reversed(two_teachers), "--teacher_fc", "yes", "no"))
    # each head evaluates on its own
    ckpt = os.path.join(split, "checkpoints", "checkpoint_latest.pth")
    assert load_eval_model(ckpt, use_pred=2).feat_dim == 1000 and load_eval_model(ckpt, use_pred=True).feat_dim == 512
    with pytest.raises(UserError, match="--head 3: .* holds 2 prediction head"):
        load_eval_model(ckpt, use_pred=3)


@pytest.mark.slow
def test_a_cached_and_a_live_teacher_together(tiny_data, two_teachers, tmp_path):
    """With lr 0 the student never moves, so each logged per-teacher loss is the regression loss of its
    head at initialisation against that teacher: teacher 1 live on the loader's crops, teacher 2 from its
    cache (centre crops), row by sample index."""
    train_dir = os.path.join(tiny_data, "train")
    crops = IndexedImageFolder(train_dir, CenterCrop(32, 32))
    cache = str(tmp_path / "t2.npy")
    build_cache(load_teacher(two_teachers[1]), crops, cache, {"teacher": {"arch": "resnet18", "format": "torchvision",
                "use_fc": False, "weights_sha256": ""}, "preprocessing": {"crop_size": 32, "resize_size": 32}},
                batch_size=4, num_workers=0, dist_info=DistInfo())  # fmt: skip
    flags = ["--teacher_weights", two_teachers[0], "-", "--use_cache", "--teacher_feats", "-", cache]
    stats = run(argv_for(tiny_data, str(tmp_path / "mixed"), 1, *flags, extra=["--learning_rate", "0"]))

    torch.manual_seed(0)  # what train_student.py draws: the student after its seed
    student = Student("resnet18", [512, 512], 4)
    student.train()
    live = load_teacher(two_teachers[0])
    rows = torch.from_numpy(__import__("numpy").load(cache)).float()
    views = TrainViews(32, True, True, False, "auto")
    loader = build_loader(IndexedImageFolder(train_dir, views, seed=0), 4, num_workers=0, seed=0)
    loader.sampler.set_epoch(1)
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for images, _, index in loader:
            x = images.float() / 255
            preds = student(x)
            sums += torch.tensor([regression_loss(preds[0], live(x)), regression_loss(preds[1], rows[index])])
    expected = (sums / len(loader)).tolist()
    assert stats["loss_teacher_1"] == pytest.approx(expected[0], rel=1e-5)
    assert stats["loss_teacher_2"] == pytest.approx(expected[1], rel=1e-5)
    assert dataset_fingerprint(crops)["n_images"] == 16


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--arch_teacher", "resnet18", "resnet18", "resnet18"], "--arch_teacher has 3 values for 2 teachers"),
        (["--teacher_loss_weights", "1", "2", "3"], "--teacher_loss_weights has 3 values for 2 teachers"),
        (["--teacher_loss_weights", "1", "-1"], "non-negative numbers with a positive sum"),
        (["--teacher_fc", "maybe"], "--teacher_fc takes yes or no per teacher"),
        (
            ["--use_cache", "--teacher_feats", "a.npy", "b.npy", "c.npy"],
            "--teacher_weights has 2 values for 3 teachers",
        ),
    ],
)
def test_a_wrong_number_of_per_teacher_values_is_one_sentence(tiny_data, two_teachers, tmp_path, flags, message):
    argv = argv_for(tiny_data, str(tmp_path / "e"), 1, "--teacher_weights", *two_teachers, *flags)
    with pytest.raises(UserError, match=message):
        run(argv)


def test_data_root_may_follow_the_teacher_files(two_teachers):
    """The original's order, --teacher_weights FILE DATA, still gives the data root, with one or two teachers."""
    parse = train_student.get_args_parser().parse_args
    one = parse(["--epochs", "3", "--teacher_weights", two_teachers[0], "/data/imagenet"])
    assert (one.data, one.teacher_weights) == ("/data/imagenet", two_teachers[0])
    two = parse(["--teacher_weights", *two_teachers, "/data/imagenet"])
    assert (two.data, two.teacher_weights) == ("/data/imagenet", list(two_teachers))
    fc = parse(["--teacher_weights", two_teachers[0], "--teacher_fc", "/data/imagenet"])
    assert (fc.data, fc.teacher_fc) == ("/data/imagenet", True)
    with pytest.raises(SystemExit):
        parse(["--teacher_weights", two_teachers[0]])  # no data root at all


# ============ 2-process DDP equals 1 process, with two teachers ============
class ToyImages:
    def __len__(self):
        return 16

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        g = torch.Generator().manual_seed(index)
        return torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8), 0, index


class TwoHeads(torch.nn.Module):
    """BatchNorm-free, so per-rank statistics cannot differ from the 1-process run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                           torch.nn.Flatten())  # fmt: skip
        self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 6), torch.nn.Linear(4, 9)])

    def forward(self, x):
        f = self.encoder(x)
        return [h(f) for h in self.heads]


def train_two_teacher_toy(rank: int, world_size: int, out: str) -> None:
    student = TwoHeads()
    model = torch.nn.parallel.DistributedDataParallel(student) if world_size > 1 else student
    teachers = TeacherSet([LinearTeacher(6, 1), LinearTeacher(9, 2)], [1.0, 1.0])
    opt = build_optimizer(student.parameters(), 0.1, 0.9, 1e-4, torch.device("cpu"))
    loader = build_loader(ToyImages(), 8 // world_size, num_workers=0, rank=rank, world_size=world_size, seed=3)
    cfg = StepConfig(DistInfo(rank, world_size), None, False, print_freq=1000)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        stats = train_student.train_one_epoch(model, teachers, loader, opt, scaler, epoch, cfg)
    if rank == 0:
        torch.save({"params": student.state_dict(), "stats": stats}, out)


def _worker(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        train_two_teacher_toy(rank, world_size, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_gloo_equals_one_process_with_two_teachers(tmp_path):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    train_two_teacher_toy(0, 1, one)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), two), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-5, atol=1e-6)
    for key in ("loss", "loss_teacher_1", "loss_teacher_2"):
        assert b["stats"][key] == pytest.approx(a["stats"][key], rel=1e-5), key
    assert a["stats"]["loss"] == pytest.approx((a["stats"]["loss_teacher_1"] + a["stats"]["loss_teacher_2"]) / 2)
    assert not torch.equal(a["params"]["heads.1.weight"], TwoHeads().state_dict()["heads.1.weight"])  # it trained
