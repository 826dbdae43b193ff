"""How a distillation step runs: the images to the device, autocast, the optimizer; what the step
computes is :func:`models.simreg.distillation_losses`.

``distill_step`` is the function ``train_student.py`` calls and the benchmark times: images to the
device as float in [0, 1] (decoded there first with ``--decode gpu``), the method's losses with both
forwards under autocast (the loss itself in fp32), one optimizer step, no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from data.device_decode import EncodedBatch
from models.simreg import distillation_losses
from tools.engine.distributed import DistInfo
from tools.engine.meters import StopVote

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp``: ``auto`` is bf16 on CUDA and fp32 (None) elsewhere."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def channels_last_default(flag: bool | None, device: torch.device, amp: torch.dtype | None) -> bool:
    """``--channels_last`` (True) / ``--no_channels_last`` (False), else on for CUDA under bf16 or fp16 autocast.

    Why on there: cuDNN runs half-precision convolutions on tensor cores in NHWC; fed NCHW tensors it
    transposes every convolution's input and output around the kernel (about a tenth to a quarter of a
    ResNet's step, by NVIDIA's and PyTorch's published measurements). Off on a CPU (NCHW is what the exact
    CPU tests pin and oneDNN's default) and for float32 on CUDA (no tensor-core layout to match).
    """
    if flag is not None:
        return flag
    return device.type == "cuda" and amp in (torch.bfloat16, torch.float16)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` at ``dtype``, or a disabled one for fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Networks built inside draw their initial weights in ``dtype``.

    float64 matters beyond precision: PyTorch's float32 ``normal_`` takes a vectorised path whose values
    depend on the CPU's vector width, its float64 ``normal_`` does not, so a ``--float64`` run starts from
    the same weights on every CPU.
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@dataclass
class StepConfig:
    """How training steps run (not what they compute)."""

    dist_info: DistInfo
    amp_dtype: torch.dtype | None
    channels_last: bool
    print_freq: int
    ckpt_every_steps: int = 0  # 0: checkpoints at epoch ends only
    stop: StopVote | None = None  # called after every step: True when all ranks stop (on a signal)
    dtype: torch.dtype = torch.float32  # the networks' parameters and the images fed to them (--float64)
    dense_weight: float = 1.0  # --loss both: the dense term's weight (models.simreg.objective_losses)
    loss_names: tuple[str, ...] | None = None  # the step's loss vector, entry by entry (models.simreg.loss_names)

    @property
    def device(self) -> torch.device:
        return self.dist_info.device


def to_device_images(batch: torch.Tensor | EncodedBatch, cfg: StepConfig) -> torch.Tensor:
    """uint8 (B, 3, H, W), or encoded JPEGs decoded here on the device (``--decode gpu``) -> float in [0, 1]
    (``cfg.dtype``) on the device; the networks normalise inside."""
    if isinstance(batch, EncodedBatch):
        x = batch.decode(cfg.device)
    else:
        x = batch.to(cfg.device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(cfg.dtype).div_(255.0)


def distill_step(model, teacher, views, index: torch.Tensor, optimizer, scaler, cfg: StepConfig) -> torch.Tensor:
    """One optimisation step on a loader batch; returns the detached loss on the device (no host sync).

    ``views`` is one uint8 batch (B, 3, H, W) fed to both networks (single view) or a pair
    (student view, teacher view). What the step computes is :func:`models.simreg.distillation_losses`;
    here it runs: images to the device, both forwards under autocast, one optimizer step (through the
    gradient scaler). With several teachers (a :class:`models.teachers.TeacherSet`) the returned loss is
    the (K + 1,) vector ``[weighted total, per-teacher losses]``, with ``--loss both`` followed by the global
    and dense terms (:func:`models.simreg.loss_names`); one step over the backbone and all heads.
    """
    x_s = to_device_images(views[0] if isinstance(views, (list, tuple)) else views, cfg)
    x_t = to_device_images(views[1], cfg) if isinstance(views, (list, tuple)) else x_s
    context = lambda: autocast(cfg.device, cfg.amp_dtype)  # noqa: E731
    losses = distillation_losses(model, teacher, x_s, x_t, index, context, cfg.dense_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    if len(losses) > 1:  # [loss, per-teacher losses, global and dense terms]: models.simreg.loss_names
        return torch.cat([v.reshape(-1) for v in losses.values()]).detach()
    return losses["loss"].detach()


def build_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """The paper's SGD (weight decay on every parameter); the fused kernel where the device has one."""
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu")
    )
