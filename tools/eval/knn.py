"""Exact k-nearest-neighbour classification on L2-normalised features, two backends, two votes.

Neighbours are the training features with the largest cosine similarity to a query (for unit
vectors the same order as the original's FAISS L2 search). Backends:
- ``torch``: chunked matrix products on any device; memory is bounded by ``chunk`` query rows
  (chunk x N similarities at a time), never the full test x train matrix;
- ``faiss``: a flat inner-product index (on all GPUs when the installed faiss sees any).
Both search in float32 and return the same neighbours. Votes:
- ``majority``: the paper's unweighted vote; ties broken at random (a fixed-seed hash of query and
  class, so the answer does not depend on chunking) or deterministically (``nearest``: the tied class
  whose first neighbour ranks highest);
- ``weighted``: DINO's vote, each neighbour weighted by exp(cos / T), T = 0.07.

``knn_predict`` (one k, one vote) is the call for benchmarks; ``knn_classify`` runs one search for
the largest k and reports every k with both votes.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss")
TIES = ("random", "nearest")
# Default similarity block: this many float32 elements (query rows x train rows) at a time.
BLOCK_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 27}  # 1 GiB on a GPU, 512 MiB on the CPU (float32)
VOTE_ROWS = 4096  # queries per vote table (rows x classes float64)


def faiss_module():
    """The faiss module, or None when it is not installed."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise here
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: torch (as fast as faiss-cpu or faster, see docs/evaluation.md), unless the device is the CPU and
    only faiss can reach a GPU."""
    if backend not in BACKENDS:
        raise UserError(f"unknown k-NN backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        faiss = faiss_module() if device.type == "cpu" else None
        return "faiss" if faiss is not None and faiss.get_num_gpus() > 0 else "torch"
    if backend == "faiss" and faiss_module() is None:
        raise UserError("--backend faiss needs the faiss package: pip install faiss-cpu (or a faiss GPU build)")
    return backend


def default_chunk(n_train: int, device: torch.device) -> int:
    """Query rows per block so that one block of similarities stays within BLOCK_ELEMENTS."""
    return max(1, BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"]) // max(n_train, 1))


@torch.no_grad()
def knn_search(
    train: torch.Tensor,
    test: torch.Tensor,
    k: int,
    *,
    backend: str = "auto",
    chunk: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by inner product: train (N, D), test (M, D) -> (similarities (M, k) float32, indices (M, k) int64).

    Rows are sorted by decreasing similarity. Inputs are used as given (normalise them first for
    cosine similarity); results are on the CPU.
    """
    device = torch.device(device)
    if not 1 <= k <= train.shape[0]:
        raise UserError(f"k={k} must be between 1 and the number of training samples ({train.shape[0]})")
    if train.shape[1] != test.shape[1]:
        raise UserError(f"train features are {train.shape[1]}-d but test features {test.shape[1]}-d")
    backend = resolve_backend(backend, device)
    if backend == "faiss":
        return _faiss_search(train, test, k)
    return _torch_search(train, test, k, chunk or default_chunk(train.shape[0], device), device)


def _torch_search(train, test, k, chunk, device):
    bank = train.to(device, torch.float32)
    sims = torch.empty(test.shape[0], k)
    idx = torch.empty(test.shape[0], k, dtype=torch.long)
    for start in range(0, test.shape[0], chunk):
        queries = test[start : start + chunk].to(device, torch.float32)
        values, indices = torch.topk(queries @ bank.T, k, dim=1)  # (chunk, N) block only
        sims[start : start + chunk] = values.cpu()
        idx[start : start + chunk] = indices.cpu()
    return sims, idx


def _faiss_search(train, test, k):
    faiss = faiss_module()
    index = faiss.IndexFlatIP(train.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)  # float32 storage: exact, unlike the original's fp16
    index.add(np.ascontiguousarray(train.float().cpu().numpy()))
    sims, idx = index.search(np.ascontiguousarray(test.float().cpu().numpy()), k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


# ---------------------------------------------------------------- votes
def _hash_uniform(rows: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Pseudo-random numbers in [0, 1) for (query row, class, seed): (M, C), chunking-independent."""
    cls = torch.arange(num_classes, dtype=torch.int64)
    x = (rows.view(-1, 1).to(torch.int64) * 40503 + cls.view(1, -1) * 2654435 + seed * 97 + 1) & 0xFFFFFFFF
    for _ in range(3):  # integer mixing rounds; every product stays below 2**63
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x.double() / 2**32


def majority_vote(
    nn_labels: torch.Tensor,
    num_classes: int,
    *,
    ties: str = "random",
    seed: int = 0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's unweighted vote: nn_labels (M, k) int64, nearest first -> predictions (M,).

    ``ties="random"`` picks uniformly among the classes with the most votes (reproducible from
    ``seed`` and each query's global row number ``rows``); ``ties="nearest"`` picks the tied class
    that owns the highest-ranked neighbour.
    """
    m, k = nn_labels.shape
    counts = torch.zeros(m, num_classes, dtype=torch.float64).scatter_add_(
        1, nn_labels, torch.ones(m, k, dtype=torch.float64)
    )
    if ties == "random":
        rows = torch.arange(m) if rows is None else rows
        bonus = _hash_uniform(rows, num_classes, seed) * 0.5  # < 1: only separates equal counts
    elif ties == "nearest":
        first = torch.full((m, num_classes), float(k), dtype=torch.float64)
        ranks = torch.arange(k, dtype=torch.float64).expand(m, k)
        first.scatter_reduce_(1, nn_labels, ranks, reduce="amin")
        bonus = (k - first) / (k + 1)  # earlier first neighbour -> larger, always < 1
    else:
        raise UserError(f"unknown tie rule '{ties}'; choose one of {', '.join(TIES)}")
    return (counts + bonus).argmax(dim=1)


def weighted_scores(nn_sims: torch.Tensor, nn_labels: torch.Tensor, num_classes: int, temperature: float = 0.07):
    """DINO's vote: per-class sums of exp(cos / T) over the neighbours -> scores (M, C) float64."""
    weights = (nn_sims.double() / temperature).exp()
    return torch.zeros(nn_labels.shape[0], num_classes, dtype=torch.float64).scatter_add_(1, nn_labels, weights)


# ---------------------------------------------------------------- the calls scripts make
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    backend: str = "auto",
    chunk: int | None = None,
    *,
    vote: str = "majority",
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    temperature: float = 0.07,
    ties: str = "random",
    seed: int = 0,
) -> torch.Tensor:
    """Predicted labels (M,) for test_feats (M, D) from train_feats (N, D) and train_labels (N,).

    Features are L2-normalised here; ``vote`` is ``majority`` or ``weighted``.
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    sims, idx = knn_search(
        F.normalize(train_feats.float(), dim=1),
        F.normalize(test_feats.float(), dim=1),
        k,
        backend=backend,
        chunk=chunk,
        device=device,
    )
    nn_labels = train_labels.cpu().long()[idx]
    if vote == "majority":
        return majority_vote(nn_labels, num_classes, ties=ties, seed=seed)
    if vote == "weighted":
        return weighted_scores(sims, nn_labels, num_classes, temperature).argmax(dim=1)
    raise UserError(f"unknown vote '{vote}'; choose majority or weighted")


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 20),
    *,
    backend: str = "auto",
    chunk: int | None = None,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    temperature: float = 0.07,
    ties: str = "random",
    seed: int = 0,
) -> dict:
    """Accuracy (%) for every k with both votes, from one search at max(ks).

    Returns ``{"k": {k: {"majority": {"top1"}, "weighted": {"top1", "top5"}}}, ...}``.
    """
    device = torch.device(device)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    resolved = resolve_backend(backend, device)
    sims, idx = knn_search(
        F.normalize(train_feats.float(), dim=1),
        F.normalize(test_feats.float(), dim=1),
        max(ks),
        backend=resolved,
        chunk=chunk,
        device=device,
    )
    nn_labels, truth = train_labels.cpu().long()[idx], test_labels.cpu().long()
    hits = {k: torch.zeros(3, dtype=torch.long) for k in set(ks)}  # majority top-1, weighted top-1/top-5
    for start in range(0, truth.shape[0], VOTE_ROWS):  # (rows, C) vote tables stay small
        rows = torch.arange(start, min(start + VOTE_ROWS, truth.shape[0]))
        labels, y = nn_labels[rows], truth[rows].view(-1, 1)
        for k in hits:
            majority = majority_vote(labels[:, :k], num_classes, ties=ties, seed=seed, rows=rows)
            top5 = weighted_scores(sims[rows, :k], labels[:, :k], num_classes, temperature)
            top5 = top5.topk(min(5, num_classes), dim=1).indices
            hits[k] += torch.stack(
                [(majority == y[:, 0]).sum(), (top5[:, 0] == y[:, 0]).sum(), (top5 == y).any(dim=1).sum()]
            )
    n = max(truth.shape[0], 1)
    out = {
        k: {
            "majority": {"top1": 100.0 * h[0].item() / n},
            "weighted": {"top1": 100.0 * h[1].item() / n, "top5": 100.0 * h[2].item() / n},
        }
        for k, h in sorted(hits.items())
    }
    return {
        "k": out,
        "n_train": int(train_feats.shape[0]),
        "n_test": int(test_feats.shape[0]),
        "backend": resolved,
        "temperature": temperature,
        "ties": ties,
        "seed": seed,
    }
