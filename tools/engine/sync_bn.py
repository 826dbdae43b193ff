"""BatchNorm statistics over every process of a run (``train_student.py --sync_bn``), on any device and backend.

By default each process normalises its share of the batch with that share's own statistics: 32 images
per GPU at the paper's batch of 256 on 8 GPUs, as the original's DataParallel did per replica. With
``--sync_bn`` every BatchNorm of the student (backbone and heads) normalises with the mean and variance
of the whole global batch, and the running statistics follow them, so a run on W processes computes
what one process with the whole batch computes (tests/test_ddp.py, gloo on the CPU).

This is a small implementation of the same method as ``torch.nn.SyncBatchNorm`` (one all_gather of each
process's count, mean and variance per layer in the forward pass, combined exactly; one all_reduce of
two sums per layer in the backward pass), written with plain tensor operations because PyTorch's runs on
GPUs only, and the synchronised path must run (and be tested) on CPU processes over gloo too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models.errors import UserError

PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _shape(x: torch.Tensor) -> tuple[list[int], tuple[int, ...]]:
    """The reduced dimensions (all but channels) and the per-channel broadcast shape of ``x`` (N, C, ...)."""
    return [0, *range(2, x.dim())], (1, x.shape[1]) + (1,) * (x.dim() - 2)


class _SyncBatchNormFn(torch.autograd.Function):
    """Training-mode BatchNorm over the union of every process's batch (sums in float32 or wider)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):
        acc = torch.promote_types(x.dtype, torch.float32)
        dims, shape = _shape(x)
        channels = x.shape[1]
        xf = x.to(acc)
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        count = torch.full((1,), x.numel() // channels, dtype=acc, device=x.device)
        local = torch.cat([count, mean, var])  # (1 + 2C,): this process's count, mean and variance
        everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, local)
        stats = torch.stack(everyone)  # (W, 1 + 2C)
        counts, means, variances = stats[:, :1], stats[:, 1 : channels + 1], stats[:, channels + 1 :]
        n = counts.sum()
        mean_all = (counts * means).sum(0) / n
        var_all = (counts * (variances + (means - mean_all) ** 2)).sum(0) / n  # exact combination (biased)
        invstd = torch.rsqrt(var_all + eps)
        if running_mean is not None:  # as BatchNorm updates them: the unbiased variance
            running_mean.mul_(1 - momentum).add_(mean_all.to(running_mean.dtype) * momentum)
            running_var.mul_(1 - momentum).add_((var_all * n / (n - 1)).to(running_var.dtype) * momentum)
        xhat = (xf - mean_all.view(shape)) * invstd.view(shape)
        y = xhat if weight is None else xhat * weight.view(shape).to(acc) + bias.view(shape).to(acc)
        ctx.save_for_backward(x, weight, mean_all, invstd, n)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims, shape = _shape(x)
        channels = x.shape[1]
        dyf = dy.to(mean.dtype)
        xhat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        sum_dy, sum_dy_xhat = dyf.sum(dims), (dyf * xhat).sum(dims)  # this process's (the parameters' gradients)
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both)  # the whole batch's, for the input's gradient
        scale = invstd if weight is None else invstd * weight.to(mean.dtype)
        mean_dy, mean_dy_xhat = (both[:channels] / n).view(shape), (both[channels:] / n).view(shape)
        dx = (dyf - mean_dy - xhat * mean_dy_xhat) * scale.view(shape)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx.to(x.dtype), grad_w, grad_b, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the whole global batch in training when several processes run; plain BatchNorm otherwise.

    Same parameters, buffers and state-dict keys as BatchNorm1d/2d/3d (checkpoints and the exported
    backbone are unchanged); input (N, C, ...).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        several = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not several:
            return super().forward(x)
        return self._synchronised(x)

    @torch.compiler.disable  # collectives inside an autograd function: run eagerly under --compile
    def _synchronised(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as BatchNorm keeps it
                momentum = 1.0 / float(self.num_batches_tracked)
        stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, *stats, self.eps, momentum)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm1d/2d/3d in ``module`` replaced by a :class:`SyncBatchNorm` holding the same parameters
    and buffers (before the optimizer is built); returns the module (a new one if it was a BatchNorm itself).

    A BatchNorm subclass with more behaviour (timm's BatchNormAct2d applies an activation too) is refused
    rather than replaced by a plain normalisation.
    """
    if type(module) in PLAIN:
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)  # fmt: skip
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(sync, name, tensor)  # the very tensors: nothing copied, nothing re-initialised
        return sync.train(module.training)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        raise UserError(
            f"--sync_bn replaces BatchNorm1d/2d/3d layers, but the student has a {type(module).__name__}; "
            "drop --sync_bn for this student"
        )
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module
