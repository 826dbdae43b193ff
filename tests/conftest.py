"""Shared fixtures: tiny image folders and teacher checkpoints in public layouts, written in tmp_path."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def write_image_folder(root: str, classes=("a", "b"), per_class: int = 8, size: int = 32, seed: int = 0) -> str:
    """root/<class>/<i>.png with random RGB content; returns root."""
    rng = np.random.RandomState(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            arr = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"{i:03d}.png"))
    return root


@pytest.fixture
def tiny_data(tmp_path) -> str:
    """A dataset root with train/ (2 classes x 8) and val/ (2 x 4) of 32x32 PNGs."""
    root = tmp_path / "data"
    write_image_folder(str(root / "train"), per_class=8, seed=0)
    write_image_folder(str(root / "val"), per_class=4, seed=1)
    return str(root)


@pytest.fixture
def resnet18_teacher_file(tmp_path) -> str:
    """A random ResNet-18 saved as a plain torchvision state dict (fc included)."""
    torch.manual_seed(123)
    path = str(tmp_path / "teacher_r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


class Payload:
    """Unpickling this would create a marker file: checkpoints carrying it must be refused, never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small CPU models (``pytestmark = pytest.mark.usefixtures(...)``):
    on a busy 2-core machine two spinning threads are far slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_random_resnet18(path) -> str:
    """A seeded random ResNet-18 in torchvision's layout, BatchNorm statistics away from 0 and 1."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return str(path)
