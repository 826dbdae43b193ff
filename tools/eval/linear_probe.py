"""The paper's linear probe: L2-normalise -> fixed standardisation -> Linear, and its training loops.

The standardisation uses the mean and unbiased variance of the L2-normalised centre-crop features over
the whole train set (eps 1e-5) and is not learned. SGD lr 0.01, momentum 0.9, weight decay 1e-4,
batch 256, 40 epochs, lr x0.1 after epochs 15 and 30 (the original's MultiStepLR([15, 30, 40])).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.errors import UserError
from models.io import atomic_save, safe_load
from tools.engine import distributed

log = logging.getLogger(__name__)

STATS_FILE = "train_stats.pt"


class LinearProbe(nn.Module):
    """features (B, D) -> logits (B, C): L2-normalise, (x - mean) / sqrt(var + eps), Linear(D, C)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, num_classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("inv_std", (var.double() + eps).rsqrt().float())
        self.linear = nn.Linear(mean.numel(), num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = F.normalize(feats.float(), dim=1)  # the original divided by the norm (no eps); same on real features
        return self.linear((x - self.mean) * self.inv_std)


def probe_optimizer(
    params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """The probe's SGD (the paper's: lr 0.01, momentum 0.9, weight decay 1e-4), PyTorch's default kernel."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def feature_statistics(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance (D,) of the L2-normalised rows of feats (N, D), in float64."""
    x = F.normalize(feats.double(), dim=1)
    var, mean = torch.var_mean(x, dim=0, correction=1)
    return mean, var


def load_statistics(folder: str, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Saved (mean, var) when their key (checkpoint hash, preprocessing, images) matches, else None."""
    path = os.path.join(folder, STATS_FILE)
    if not os.path.isfile(path):
        return None
    saved = safe_load(path, "feature statistics")
    if not isinstance(saved, dict) or saved.get("key") != key:
        log.warning("feature statistics in %s belong to another checkpoint or setting; recomputing", path)
        return None
    log.info("reusing feature statistics %s", path)
    return saved["mean"], saved["var"]


def save_statistics(folder: str, key: dict, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    atomic_save({"key": key, "mean": mean, "var": var, "n": n}, os.path.join(folder, STATS_FILE))


def step_lr(base_lr: float, epoch: int, milestones: tuple[int, ...]) -> float:
    """lr for 1-based ``epoch``: x0.1 for every milestone already passed (15, 30: epochs 16 and 31 drop)."""
    return base_lr * 0.1 ** sum(epoch > m for m in milestones)


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def train_epoch_cached(
    probe: nn.Module,
    feats: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
) -> dict:
    """One epoch over cached features (N, D) held on the probe's device, in a seeded random order.

    Every sample is used once (the last batch may be smaller); the loss is read back once per epoch.
    """
    probe.train()
    order = epoch_permutation(feats.shape[0], seed, epoch, feats.device)
    loss_sum = torch.zeros((), device=feats.device)
    correct = torch.zeros((), device=feats.device)
    for start in range(0, feats.shape[0], batch_size):
        idx = order[start : start + batch_size]
        logits = probe(feats[idx])
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * idx.numel()
        correct += (logits.argmax(1) == labels[idx]).sum()
    n = feats.shape[0]
    return {"train_loss": loss_sum.item() / n, "train_top1": 100.0 * correct.item() / n}


def train_epoch_images(
    probe: nn.Module,
    backbone: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    epoch: int,
    is_main: bool = True,
) -> dict:
    """One epoch on augmented images: frozen backbone (eval mode, no gradients) -> probe."""
    probe.train()
    backbone.eval()  # frozen: BatchNorm keeps its running statistics, as in the paper
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    for images, labels, _ in tqdm(loader, desc=f"linear {epoch}", disable=None if is_main else True, leave=False):
        x = images.to(device, non_blocking=True).float().div_(255.0)
        labels = labels.to(device, non_blocking=True)
        with torch.no_grad(), autocast:
            feats = backbone(x)
        logits = probe(feats.float())
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.numel()
    totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)])
    totals = distributed.all_reduce_sum(totals)
    seen = max(totals[2].item(), 1.0)
    return {"train_loss": totals[0].item() / seen, "train_top1": 100.0 * totals[1].item() / seen}


@torch.no_grad()
def evaluate_probe(probe: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> dict:
    """Top-1 / top-5 accuracy (%) and loss of the probe on features (M, D) with labels (M,)."""
    probe.eval()
    hits = torch.zeros(2, dtype=torch.float64)
    loss = 0.0
    for start in range(0, feats.shape[0], batch):
        x = feats[start : start + batch]
        y = labels[start : start + batch].to(x.device)
        logits = probe(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits += torch.tensor([(top5[:, 0] == y).sum().item(), (top5 == y.view(-1, 1)).any(1).sum().item()])
    n = max(feats.shape[0], 1)
    return {"top1": 100.0 * hits[0].item() / n, "top5": 100.0 * hits[1].item() / n, "val_loss": loss / n}


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter and buffer, to prove later that nothing changed."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """RuntimeError naming the tensors of a frozen network that differ from ``snapshot``."""
    now = module.state_dict()
    changed = [k for k, v in snapshot.items() if not torch.equal(now[k].detach().cpu(), v)]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during the linear probe: {', '.join(changed[:8])}")


# ---------------------------------------------------------------- resumable state
def save_probe_checkpoint(path: str, *, epoch: int, key: dict, settings: dict, probe, optimizer, history) -> None:
    state = {
        "version": 1,
        "epoch": epoch,
        "key": key,
        "settings": settings,
        "probe": probe.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
    }
    atomic_save(state, path)


def load_probe_checkpoint(path: str, key: dict, settings: dict) -> dict:
    """A saved probe run, refused when it belongs to another checkpoint or other probe settings."""
    state = safe_load(path, "linear probe checkpoint")
    if not isinstance(state, dict) or "probe" not in state:
        raise UserError(f"'{path}' is not a linear probe checkpoint of this project")
    if state.get("key") != key:
        raise UserError(
            f"linear probe checkpoint '{path}' was trained on another backbone, images or preprocessing; "
            "pass --no_resume to start over, or use another --save folder"
        )
    diff = [f"{k}: {state['settings'].get(k)} -> {v}" for k, v in settings.items() if state["settings"].get(k) != v]
    if diff:
        raise UserError(
            f"linear probe checkpoint '{path}' used other settings ({'; '.join(diff[:4])}); "
            "pass --no_resume to start over"
        )
    return state
