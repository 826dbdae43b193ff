"""Inference-only graph rewrites for frozen networks (the teacher): BatchNorm folded into convolutions."""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)


def fold_batchnorm(module: nn.Module) -> fx.GraphModule:
    """An eval-only copy of ``module`` where each BatchNorm2d fed by a Conv2d alone is folded into it.

    ``y = bn(conv(x))`` becomes one convolution with weight ``w * g / sqrt(v + eps)`` and bias
    ``(b - m) * g / sqrt(v + eps) + beta`` (running statistics, so valid in eval mode only). Same
    outputs up to float rounding; the input module is left untouched. The network must be
    traceable by ``torch.fx`` (torchvision ResNets and MobileNet-v2 are).
    """
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (BatchNorm running statistics)")
    gm = fx.symbolic_trace(copy.deepcopy(module))
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if not (
            isinstance(conv_node, fx.Node)
            and conv_node.op == "call_module"
            and isinstance(modules[conv_node.target], nn.Conv2d)
            and len(conv_node.users) == 1
        ):
            continue
        fused = fuse_conv_bn_eval(modules[conv_node.target], modules[node.target])
        parent, _, name = conv_node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval().requires_grad_(False)


def count_batchnorms(module: nn.Module) -> int:
    """Number of BatchNorm layers left in ``module`` (0 after folding a plain ResNet)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def compile_frozen(module: nn.Module, backend: str = "inductor", fold: bool = True) -> nn.Module:
    """BatchNorm folded, then ``torch.compile``d: the fast form of a frozen feature extractor.

    A network without BatchNorm (a ViT) is compiled as it is; one that ``torch.fx`` cannot trace (some
    timm CNNs) is compiled unfolded, with a log line. ``fold=False`` compiles the network as it is (its
    modules and their hooks kept, as the dense objectives' feature-map taps need).
    """
    if not fold or count_batchnorms(module) == 0:
        return torch.compile(module, backend=backend)
    try:
        folded = fold_batchnorm(module)
    except Exception as exc:  # fx's trace errors are of many types (TraceError, TypeError, control flow...)
        log.info("teacher not traceable by torch.fx (%s): compiled without BatchNorm folding", type(exc).__name__)
        folded = module
    return torch.compile(folded, backend=backend)
