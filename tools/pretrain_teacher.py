"""Train the demo's small teacher on an ImageFolder and save it in its network's public layout.

The demo stands in for a downloaded self-supervised teacher with one trained on the demo's labels
(the original also accepted supervised teachers): a MoCo-v2 trained from scratch on 1,400 tiny images
for the few minutes the demo allows stays below a randomly initialised network on k-NN, so it would
not show distillation working. The file is the network's plain state dict (classifier included): a
torchvision state dict for a torchvision name, timm's own names for ``timm/<name>``, so it is read by
the same loading code as a downloaded checkpoint of that network.

    python -m tools.pretrain_teacher demo_data --arch timm/resnet10t --epochs 6 --out demo_teacher.pth
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torchvision
from torch import nn

from data.datasets import IndexedImageFolder, split_folder
from data.loaders import build_loader
from data.transforms import WeakAug
from models.backbones import IMAGENET_MEAN, IMAGENET_STD, Normalize, canonical_arch, is_timm_arch, timm_name
from models.errors import UserError
from models.io import atomic_save
from tools.engine import cli
from tools.engine.logs import setup_logging
from tools.engine.schedules import cosine_lr, set_lr

log = logging.getLogger("simreg.pretrain_teacher")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = cli.ArgumentParser("supervised demo teacher", add_help=add_help)
    p.add_argument("data", help="dataset root with train/<class>/<image>")
    p.add_argument("--arch", default="resnet18", help="a torchvision classification model or timm/<name>")
    p.add_argument("--epochs", type=cli.positive_int, default=15)
    p.add_argument("--batch_size", type=cli.positive_int, default=64)
    p.add_argument("--learning_rate", type=cli.positive_float, default=0.05)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                   help="sgd (momentum 0.9, weight decay 5e-4) or adamw (weight decay 0.05; the demo)")  # fmt: skip
    p.add_argument("--image_size", type=cli.image_size_int, default=32)
    cli.add_workers_arg(p, "num_workers", default=2)
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    p.add_argument("--out", required=True, help="output .pth (the network's state dict, classifier included)")
    cli.add_debug_flag(p)
    return p


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """SGD (the original demo recipe) or AdamW, which leaves chance level in fewer epochs at 32 px."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """A torchvision network, or timm's ``timm/<name>``, with a ``num_classes`` classifier and no weights."""
    if is_timm_arch(arch):
        import timm

        return timm.create_model(timm_name(arch), pretrained=False, num_classes=num_classes)
    return getattr(torchvision.models, arch)(num_classes=num_classes)


def main(args: argparse.Namespace) -> None:
    setup_logging()
    if os.path.isdir(args.out):
        raise UserError(f"--out '{args.out}' is a folder; give the .pth file to write")
    arch = canonical_arch(args.arch)
    torch.manual_seed(args.seed)
    dataset = IndexedImageFolder(
        split_folder(args.data, "train"), WeakAug(args.image_size, (0.6, 1.0), flip=False), seed=args.seed
    )
    loader = build_loader(dataset, args.batch_size, num_workers=args.num_workers, seed=args.seed)
    net = build_classifier(arch, len(dataset.classes))
    model = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net)
    opt = make_optimizer(model, args.optimizer, args.learning_rate)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        set_lr(opt, cosine_lr(args.learning_rate, epoch, args.epochs))
        loader.sampler.set_epoch(epoch)
        correct = total = 0
        for images, labels, _ in loader:
            logits = model(images.float().div_(255))
            loss = nn.functional.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
        log.info("teacher epoch %d/%d: train accuracy %.1f%%", epoch, args.epochs, 100.0 * correct / total)
    atomic_save(net.state_dict(), args.out)
    layout = "timm's names" if is_timm_arch(arch) else "torchvision layout"
    log.info("saved %s teacher (%s) to %s in %.0f s", arch, layout, args.out, time.perf_counter() - start)


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser().parse_args())
