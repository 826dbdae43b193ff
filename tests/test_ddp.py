"""The DDP contract: a 2-process gloo run equals a 1-process run with the same global batch."""

import argparse
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_student
from data.loaders import EpochSampler, build_loader
from models.simreg import loss_names
from tools.engine.distributed import DistInfo
from tools.engine.step import StepConfig, build_optimizer
from tools.engine.sync_bn import convert_sync_batchnorm


class ToyImages:
    """20 deterministic uint8 'images' (3, 8, 8); keys may be (index, epoch) like the real dataset."""

    def __len__(self):
        return 20

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        g = torch.Generator().manual_seed(index)
        return torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8), index % 2, index


class ToyTeacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.register_buffer("w", torch.randn(3 * 8 * 8, 5, generator=g))

    def targets(self, images, indices):
        return images.flatten(1) @ self.w


def toy_student():
    torch.manual_seed(0)  # BatchNorm-free, so per-rank statistics cannot differ from the 1-process run
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 5),
    )  # fmt: skip


def toy_student_bn():
    """The toy with a BatchNorm2d and a BatchNorm1d: per-rank statistics differ from the 1-process run's."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 5),
    )  # fmt: skip


class ToyDenseTeacher(ToyTeacher):
    """Dense targets (B, 5, 4, 4) from the images' 2 x 2 blocks (a coarser grid than the student's 6 x 6 map,
    so the targets are resampled), and the pooled ones."""

    def targets(self, images, indices):
        pooled = super().targets(images, indices)
        blocks = torch.nn.functional.avg_pool2d(images.float(), 2)  # (B, 3, 4, 4)
        return {"dense": torch.cat([blocks, blocks[:, :2] ** 2], dim=1), "global": pooled}


class ToyDenseStudent(torch.nn.Module):
    """BatchNorm-free, with a map (B, 4, 6, 6), a global head and a dense (1x1 convolution) head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        self.head, self.dense = torch.nn.Linear(4, 5), torch.nn.Conv2d(4, 5, 1)

    def forward(self, x):
        fmap = self.trunk(x)
        return {"dense": [self.dense(fmap)], "global": [self.head(fmap.mean(dim=(2, 3)))]}


def train_toy(rank: int, world_size: int, out: str, bn: str = "", dense: bool = False) -> None:
    """Two epochs of the toy; ``bn``: "" (no BatchNorm), "local" (per-rank statistics) or "sync" (--sync_bn);
    ``dense``: the dense toy with --loss both (dense weight 0.5)."""
    student = ToyDenseStudent() if dense else toy_student_bn() if bn else toy_student()
    if bn == "sync":
        student = convert_sync_batchnorm(student)
    model = torch.nn.parallel.DistributedDataParallel(student) if world_size > 1 else student
    hp = argparse.Namespace(learning_rate=0.1, sgd_momentum=0.9, weight_decay=1e-4)
    opt = build_optimizer(student.parameters(), hp.learning_rate, hp.sgd_momentum, hp.weight_decay, torch.device("cpu"))
    loader = build_loader(ToyImages(), 8 // world_size, num_workers=0, rank=rank, world_size=world_size, seed=3)
    names = loss_names(1, "both") if dense else None
    cfg = StepConfig(DistInfo(rank, world_size), None, False, print_freq=1000, dense_weight=0.5, loss_names=names)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    teacher = ToyDenseTeacher() if dense else ToyTeacher()
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        stats = train_student.train_one_epoch(model, teacher, loader, opt, scaler, epoch, cfg)
    if rank == 0:
        torch.save({"params": student.state_dict(), "steps": stats["steps"],
                    **{k: v for k, v in stats.items() if k.startswith("loss")}}, out)  # fmt: skip


def _worker(rank: int, world_size: int, store: str, out: str, bn: str = "", dense: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        train_toy(rank, world_size, out, bn, dense)
    finally:
        dist.destroy_process_group()


def test_sampler_ranks_partition_the_single_process_order():
    single = EpochSampler(20, 0, 1, seed=3).indices()
    ranks = [EpochSampler(20, r, 2, seed=3).indices() for r in range(2)]
    assert [ranks[i % 2][i // 2] for i in range(20)] == single


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_gloo_equals_one_process(tmp_path):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    train_toy(0, 1, one)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), two), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a["steps"] == 2 and b["steps"] == 2
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-5, atol=1e-6)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert not torch.equal(a["params"]["4.weight"], toy_student().state_dict()["4.weight"])  # it did train


@pytest.mark.slow
@pytest.mark.distributed
def test_sync_bn_on_two_processes_equals_one_process_and_per_process_statistics_do_not(tmp_path):
    """--sync_bn: every BatchNorm normalises over the global batch (weights, running statistics, loss equal the
    1-process run's); without it each rank's 4 images give their own statistics (the documented default)."""
    one = str(tmp_path / "one.pt")
    train_toy(0, 1, one, bn="local")
    got = {}
    for bn in ("sync", "local"):
        got[bn] = str(tmp_path / f"two_{bn}.pt")
        mp.spawn(_worker, args=(2, str(tmp_path / f"store_{bn}"), got[bn], bn), nprocs=2, join=True)
    a, sync, local = (torch.load(p, weights_only=True) for p in (one, got["sync"], got["local"]))
    assert set(sync["params"]) == set(a["params"])  # the same state-dict keys as BatchNorm's
    for k in a["params"]:
        torch.testing.assert_close(sync["params"][k], a["params"][k], rtol=1e-5, atol=1e-6)
    assert sync["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert int(sync["params"]["1.num_batches_tracked"]) == 4
    assert not torch.allclose(local["params"]["1.running_var"], a["params"]["1.running_var"], rtol=1e-3)
    assert local["loss"] != pytest.approx(a["loss"], rel=1e-5)


def test_sync_bn_is_part_of_the_run_and_refuses_batchnorm_subclasses(tiny_data, resnet18_teacher_file, tmp_path):
    argv = [tiny_data, "--teacher_weights", resnet18_teacher_file, "--batch_size", "8", "--epochs", "1",
            "--image_size", "32", "--num_workers", "0", "--device", "cpu",
            "--exp_dir", str(tmp_path / "e")]  # fmt: skip
    train_student.main(train_student.get_args_parser().parse_args(argv))
    with pytest.raises(train_student.UserError, match=r"belongs to a different run \(sync_bn"):
        train_student.main(train_student.get_args_parser().parse_args([*argv, "--epochs", "2", "--sync_bn"]))

    class BatchNormAct(torch.nn.BatchNorm2d):  # timm's kind: a normalisation and an activation in one
        pass

    with pytest.raises(train_student.UserError, match="the student has a BatchNormAct; drop --sync_bn"):
        convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), BatchNormAct(4)))


def test_batch_size_must_divide_across_ranks(tiny_data, resnet18_teacher_file, tmp_path, monkeypatch):
    monkeypatch.setattr(
        train_student.distributed, "init_distributed",
        lambda device: train_student.distributed.DistInfo(0, 3, 0, torch.device("cpu")),
    )  # fmt: skip
    args = train_student.get_args_parser().parse_args(
        [tiny_data, "--teacher_weights", resnet18_teacher_file, "--batch_size", "8", "--exp_dir", str(tmp_path / "e")]
    )
    with pytest.raises(train_student.UserError, match="does not divide across 3 processes"):
        train_student.main(args)
    assert not os.path.exists(str(tmp_path / "e"))  # refused at start-up: nothing written


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_gloo_equals_one_process_with_the_dense_objective(tmp_path):
    """--loss both: the per-location loss is a mean over images and locations, so ranks' equal shares average
    to the one-process loss, and the dense and global heads' gradients are synchronised."""
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    train_toy(0, 1, one, dense=True)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), two, "", True), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a["steps"] == 2 and b["steps"] == 2 and set(a) >= {"loss_global", "loss_dense"}
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-5, atol=1e-6)
    for k in ("loss", "loss_global", "loss_dense"):
        assert b[k] == pytest.approx(a[k], rel=1e-5)
    assert a["loss"] == pytest.approx(a["loss_global"] + 0.5 * a["loss_dense"], rel=1e-6)
    assert not torch.equal(a["params"]["dense.weight"], ToyDenseStudent().state_dict()["dense.weight"])
