"""k-NN: exact against a float64 numpy brute force, both backends, both votes, chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.eval import knn


def _data(n_train=300, n_test=57, dim=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g)
    test = torch.randn(n_test, dim, generator=g)
    train_labels = torch.randint(0, classes, (n_train,), generator=g)
    return train, train_labels, test, torch.randint(0, classes, (n_test,), generator=g)


def _brute(train, train_labels, test, k, classes, temperature=0.07):
    """Neighbours, majority (ties -> class of the nearest tied neighbour) and weighted votes in numpy."""
    a = train.double().numpy()
    b = test.double().numpy()
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sims = b @ a.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    labels = train_labels.numpy()[order]
    majority, weighted, tied = [], [], []
    for i in range(len(b)):
        counts = np.bincount(labels[i], minlength=classes)
        best = set(np.flatnonzero(counts == counts.max()))
        tied.append(best)
        majority.append(next(c for c in labels[i] if c in best))
        scores = np.zeros(classes)
        np.add.at(scores, labels[i], np.exp(sims[i, order[i]] / temperature))
        weighted.append(int(np.argmax(scores)))
    return order, np.array(majority), np.array(weighted), tied


@pytest.mark.parametrize("k", [1, 20])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_matches_numpy_brute_force(k, backend):
    train, train_labels, test, _ = _data()
    order, majority, weighted, tied = _brute(train, train_labels, test, k, 5)
    n = torch.nn.functional.normalize
    _, idx = knn.knn_search(n(train, dim=1), n(test, dim=1), k, backend=backend, chunk=8)
    assert np.array_equal(idx.numpy(), order)
    kw = dict(backend=backend, chunk=8, num_classes=5)
    assert np.array_equal(knn.knn_predict(train, train_labels, test, k, vote="weighted", **kw).numpy(), weighted)
    nearest = knn.knn_predict(train, train_labels, test, k, vote="majority", ties="nearest", **kw).numpy()
    assert np.array_equal(nearest, majority)
    randomised = knn.knn_predict(train, train_labels, test, k, vote="majority", ties="random", **kw).numpy()
    assert all(int(p) in t for p, t in zip(randomised, tied, strict=True))
    if k == 20:
        assert sum(len(t) > 1 for t in tied) > 0  # the random tie rule was exercised


def test_backends_agree_and_chunk_larger_than_test_set():
    train, train_labels, test, test_labels = _data(n_train=500, n_test=9, dim=32)
    results = [
        knn.knn_classify(train, train_labels, test, test_labels, (1, 5, 20), backend=b, chunk=c, num_classes=5)
        for b, c in (("torch", 1000), ("torch", 2), ("faiss", None))
    ]
    assert results[0]["k"] == results[1]["k"] == results[2]["k"]
    n = torch.nn.functional.normalize
    s1, i1 = knn.knn_search(n(train, dim=1), n(test, dim=1), 20, backend="torch", chunk=1000)
    s2, i2 = knn.knn_search(n(train, dim=1), n(test, dim=1), 20, backend="faiss")
    assert torch.equal(i1, i2)
    assert torch.allclose(s1, s2, atol=1e-6)


def test_random_ties_are_seeded_and_chunk_independent():
    # Every query has two neighbours of different classes: a pure tie at k=2.
    labels = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2]] * 50)
    a = knn.majority_vote(labels, 4, ties="random", seed=0)
    assert torch.equal(a, knn.majority_vote(labels, 4, ties="random", seed=0))
    rows = torch.arange(100, 200)
    assert torch.equal(a[100:], knn.majority_vote(labels[100:], 4, ties="random", seed=0, rows=rows))
    assert 60 < int((a == labels[:, 0]).sum()) < 140  # about half the ties go each way
    assert not torch.equal(a, knn.majority_vote(labels, 4, ties="random", seed=1))
    assert torch.equal(knn.majority_vote(labels, 4, ties="nearest"), labels[:, 0])


def test_classify_reports_exact_accuracies():
    # Two tight clusters; the queries sit on them: every vote is right, except one mislabelled query.
    train = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    train_labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.05, 1.0], [1.0, 0.0]])
    test_labels = torch.tensor([0, 1, 1, 1])
    out = knn.knn_classify(train, train_labels, test, test_labels, (1, 2), backend="torch", ties="nearest")
    assert out["k"][1]["majority"]["top1"] == 75.0
    assert out["k"][2]["weighted"]["top1"] == 75.0
    assert out["k"][2]["weighted"]["top5"] == 100.0
    assert out["n_train"] == 4 and out["n_test"] == 4


def test_bad_k_is_a_user_error():
    train, train_labels, test, _ = _data(n_train=10)
    with pytest.raises(knn.UserError, match="between 1 and the number of training samples"):
        knn.knn_predict(train, train_labels, test, 11, backend="torch")
