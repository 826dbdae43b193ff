"""The original release's recipe, re-created as the baseline of ``tools/benchmark.py`` (never used to train).

Same maths as ours, with the costs the original paid:
- data: PIL decode, torchvision ``RandomResizedCrop`` + flip on the PIL image, ``ToTensor`` +
  ``Normalize`` in the workers (float32), and in the single-view mode the same tensor returned twice,
  so two identical float32 batches are collated, pinned and copied to the device;
- step: fp32 in NCHW layout, the teacher under ``no_grad`` with a MoCo-style batch shuffle and
  unshuffle (a no-op for a teacher in eval mode), for-loop SGD, ``loss.item()`` and a device
  synchronisation every step;
- cached linear probe: features in host memory, a ``TensorDataset`` loader (one Python index per
  sample), a copy to the device and ``loss.item()`` every step, no standardisation layer;
- k-NN: for k = 1 and 20 in turn, a new faiss flat L2 index over the L2-normalised train features (on
  all GPUs with float16 storage when faiss sees any), then a Python ``Counter`` per query, its votes
  shuffled and the largest count taken (ties at random).
DataParallel is left out: the benchmark runs on one device. "fp32" means PyTorch's defaults (cuDNN may
use TF32 convolutions on Ampere and newer), which can only make this baseline faster.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from data.datasets import IndexedImageFolder, load_rgb
from models.backbones import IMAGENET_MEAN, IMAGENET_STD, Encoder, Normalize, build_backbone
from models.simreg import Student, regression_loss
from models.teachers import Teacher


class OriginalSingleView:
    """PIL in, ``[q, q]`` out: one float32 normalised crop, returned twice (the original's single view)."""

    def __init__(self, size: int) -> None:
        self.t = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.2, 1.0)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __call__(self, img) -> list[torch.Tensor]:
        q = self.t(img)
        return [q, q]


class OriginalFolder(torch.utils.data.Dataset):
    """The files of an :class:`IndexedImageFolder`, read the original's way: ``([q, q], label)``."""

    def __init__(self, folder: IndexedImageFolder, size: int) -> None:
        self.samples, self.root = list(folder.samples), folder.root  # a list of (path, label), as torchvision's
        self.view = OriginalSingleView(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        rel, label = self.samples[index]
        return self.view(load_rgb(f"{self.root}/{rel}")), label


def original_loader(dataset: OriginalFolder, batch: int, workers: int, pin_memory: bool) -> DataLoader:
    """The original's loader: shuffled, float32 pairs, default collation (two float32 batches)."""
    settings = {"shuffle": True, "drop_last": True, "persistent_workers": workers > 0}  # as the original set them
    return DataLoader(dataset, batch, num_workers=workers, pin_memory=pin_memory, **settings)


def build_original_pair(teacher_arch: str, student_arch: str, device: torch.device) -> tuple[Teacher, Student]:
    """Randomly initialised teacher and student that take *normalised* input (the loader normalised)."""
    backbone = build_backbone(teacher_arch)
    teacher = Teacher(Encoder(backbone, backbone.feat_dim, mean=None, std=None), teacher_arch, "random")
    student = Student(student_arch, teacher.feat_dim)
    student.encoder.normalize = Normalize(None, None)
    return teacher.to(device), student.to(device)


class OriginalStep:
    """One distillation step the original's way; ``__call__(x_q, x_k)`` on float32 normalised batches."""

    def __init__(self, teacher: Teacher, student: Student, device: torch.device) -> None:
        self.teacher, self.student, self.device = teacher, student, device
        # The original's era of PyTorch: a per-parameter for-loop SGD.
        self.optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=False)

    def __call__(self, x_q: torch.Tensor, x_k: torch.Tensor) -> float:
        x_q = x_q.to(self.device, non_blocking=True)
        x_k = x_k.to(self.device, non_blocking=True)
        self.student.train()
        with torch.no_grad():  # MoCo-style shuffle / unshuffle: BatchNorm of an eval teacher ignores it
            shuffle = torch.randperm(x_k.shape[0], device=self.device)
            target = self.teacher(x_k[shuffle])[torch.argsort(shuffle)]
        loss = regression_loss(self.student(x_q), target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        value = loss.item()  # host sync every step (the original logged every step)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return value


class OriginalCachedProbe:
    """The original's cached linear probe: host features, per-sample ``TensorDataset`` indexing, sync per step."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, n_classes: int, batch: int, device) -> None:
        self.loader = DataLoader(TensorDataset(feats.cpu(), labels.cpu()), batch_size=batch, shuffle=True)
        self.device = device
        self.linear = nn.Linear(feats.shape[1], n_classes).to(device)
        self.optimizer = torch.optim.SGD(
            self.linear.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=False
        )

    def run(self, steps: int) -> int:
        """``steps`` optimisation steps; returns the number of samples seen."""
        seen = 0
        while seen < steps * self.loader.batch_size:
            for x, y in self.loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                loss = F.cross_entropy(self.linear(x), y)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                loss.item()
                seen += x.shape[0]
                if seen >= steps * self.loader.batch_size:
                    break
        return seen


def normalised_pair(u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's loader output: two identical float32 normalised batches (B, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=u8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=u8.device).view(1, 3, 1, 1)
    x = (u8.float() / 255 - mean) / std
    return x, x.clone()


# ============ k-NN ============
def faiss_or_none():
    """The faiss module, or None (the original needed it; without it the baseline uses torch)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def torch_l2_search(train: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 100) -> torch.Tensor:
    """(Q, k) indices of the k smallest L2 distances, by torch on the tensors' device, ``chunk`` queries at a time."""
    return torch.cat([torch.cdist(queries[s : s + chunk], train).topk(k, largest=False).indices
                      for s in range(0, len(queries), chunk)])  # fmt: skip


def original_search(train: np.ndarray, queries: np.ndarray, k: int, threads: int | None = None) -> np.ndarray:
    """(Q, k) neighbour indices from a new flat L2 index, as the original built one per k.

    On the GPUs (sharded, float16 storage) when faiss sees any; else on the CPU with ``threads`` threads.
    Without faiss (the original could not run at all): :func:`torch_l2_search` on the CPU.
    """
    faiss = faiss_or_none()
    if faiss is None:
        return torch_l2_search(torch.from_numpy(train), torch.from_numpy(queries), k).numpy()
    index = faiss.IndexFlatL2(train.shape[1])
    if faiss.get_num_gpus() > 0:
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16, options.shard = True, True
        index = faiss.index_cpu_to_all_gpus(index, options)
    elif threads:
        faiss.omp_set_num_threads(threads)  # the same cores as the torch search it is compared with
    index.add(train)
    return index.search(queries, k)[1]


def original_vote(train_labels: np.ndarray, neighbours: np.ndarray, rng: random.Random) -> np.ndarray:
    """The original's vote: per query a Counter of the neighbours' labels, shuffled, the largest count wins."""
    pred = np.zeros(len(neighbours), dtype=np.int64)
    for i, row in enumerate(neighbours):
        votes = list(Counter(train_labels[row].tolist()).items())
        rng.shuffle(votes)  # max() keeps the first of equal counts: a random tied class
        pred[i] = max(votes, key=lambda v: v[1])[0]
    return pred


class OriginalKnn:
    """The original's k-NN evaluation: normalise, then for each k a new search and the Python vote.

    ``device=None``: the features stay on the host and faiss searches (:func:`original_search`); with a
    device (no faiss for it), :func:`torch_l2_search` runs there in faiss's place.
    """

    def __init__(self, train, labels, queries, ks=(1, 20), threads: int | None = None, device=None) -> None:
        self.device = device
        where = device if device is not None else "cpu"
        self.train, self.queries = train.float().to(where), queries.float().to(where)
        self.labels, self.ks, self.threads = labels.cpu().numpy(), ks, threads
        self.rng = random.Random(0)

    def __call__(self) -> int:
        """One evaluation; returns the number of queries."""
        train = self.train / self.train.norm(dim=1, keepdim=True)
        queries = self.queries / self.queries.norm(dim=1, keepdim=True)
        for k in self.ks:
            if self.device is None:
                nn = original_search(train.numpy(), queries.numpy(), k, self.threads)
            else:
                nn = torch_l2_search(train, queries, k).cpu().numpy()
            original_vote(self.labels, nn, self.rng)
        return len(queries)
