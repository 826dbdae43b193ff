"""The linear probe: statistics, schedule, learning separable data, stale files, frozen-backbone check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import UserError
from tools.eval.linear_probe import (
    LinearProbe,
    assert_unchanged,
    evaluate_probe,
    feature_statistics,
    load_probe_checkpoint,
    load_statistics,
    save_probe_checkpoint,
    save_statistics,
    state_snapshot,
    step_lr,
    train_epoch_cached,
)


def test_statistics_are_those_of_the_normalised_features():
    feats = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) + 3.0
    mean, var = feature_statistics(feats)
    x = feats.double().numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert np.allclose(mean.numpy(), x.mean(0), atol=1e-12)
    assert np.allclose(var.numpy(), x.var(0, ddof=1), atol=1e-12)
    probe = LinearProbe(mean, var, 3)
    assert torch.allclose(probe.inv_std, (var + 1e-5).rsqrt().float())


def test_schedule_drops_after_epochs_15_and_30():
    lrs = {e: step_lr(0.01, e, (15, 30)) for e in (1, 15, 16, 30, 31, 40)}
    assert lrs == pytest.approx({1: 0.01, 15: 0.01, 16: 0.001, 30: 0.001, 31: 1e-4, 40: 1e-4})


def test_probe_learns_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 3
    labels = torch.arange(400) % 4
    feats = centres[labels] + 0.3 * torch.randn(400, 32, generator=g)
    torch.manual_seed(0)
    probe = LinearProbe(*feature_statistics(feats), 4)
    opt = torch.optim.SGD(probe.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for epoch in range(1, 11):
        stats = train_epoch_cached(probe, feats, labels, opt, batch_size=64, seed=0, epoch=epoch)
    assert stats["train_top1"] == 100.0
    assert evaluate_probe(probe, feats, labels)["top1"] == 100.0


def test_cached_epochs_are_reproducible():
    feats, labels = torch.randn(100, 8), torch.randint(0, 3, (100,))

    def run():
        torch.manual_seed(0)
        probe = LinearProbe(*feature_statistics(feats), 3)
        opt = torch.optim.SGD(probe.parameters(), lr=0.01, momentum=0.9)
        for epoch in (1, 2):
            train_epoch_cached(probe, feats, labels, opt, batch_size=32, seed=5, epoch=epoch)
        return probe.linear.weight

    assert torch.equal(run(), run())


def test_stale_statistics_are_recomputed_and_stale_probe_refused(tmp_path):
    key = {"model": {"weights_sha256": "aaa"}}
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    save_statistics(str(tmp_path), key, mean, var, 10)
    assert torch.equal(load_statistics(str(tmp_path), key)[1], var)
    assert load_statistics(str(tmp_path), {"model": {"weights_sha256": "bbb"}}) is None
    probe = LinearProbe(mean, var, 2)
    opt = torch.optim.SGD(probe.parameters(), lr=0.1)
    path = str(tmp_path / "checkpoint.pth")
    save_probe_checkpoint(path, epoch=3, key=key, settings={"lr": 0.1}, probe=probe, optimizer=opt, history=[])
    assert load_probe_checkpoint(path, key, {"lr": 0.1})["epoch"] == 3
    with pytest.raises(UserError, match="trained on another backbone"):
        load_probe_checkpoint(path, {"model": {"weights_sha256": "bbb"}}, {"lr": 0.1})
    with pytest.raises(UserError, match=r"other settings \(lr: 0.1 -> 0.01\)"):
        load_probe_checkpoint(path, key, {"lr": 0.01})


def test_a_changed_backbone_is_detected():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    snap = state_snapshot(net)
    assert_unchanged(net, snap)
    net.train()
    net(torch.randn(4, 3))  # updates BatchNorm running statistics
    with pytest.raises(RuntimeError, match="1.running_mean"):
        assert_unchanged(net, snap)
