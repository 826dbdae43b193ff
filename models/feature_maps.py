"""The last feature map of a network, read during its ordinary forward (the dense objective's input).

A network's feature map is what its global pooling reads, as a grid (B, C, h, w):

- ViTs (timm's ``VisionTransformer`` and ``Eva``, so the publishers' ViTs of :mod:`models.vit` and timm
  ViT students): the final-norm patch tokens, class token and registers left out; with ``blocks`` N the
  last N blocks' tokens, each through the final norm, concatenated on channels (B, N * D, h, w), as
  DINOv2's ``get_intermediate_layers(norm=True)`` gives them. torchvision's ViT: the encoder's output
  (its final LayerNorm) without the class token.
- CNNs: the input of the global average pool (the last ``AdaptiveAvgPool2d`` of a torchvision network,
  timm's ``SelectAdaptivePool2d``); where a network pools in its ``forward`` code instead, the output of
  the module that feeds the pooling (:data:`FUNCTIONAL_POOL`); DINOv3's ConvNeXt through its final
  LayerNorm, location by location, as its publishers give its dense features (:data:`NORMED_MAPS`).
- Hugging Face teachers (:mod:`models.hf_networks`) are timm ViTs and ConvNeXts: the same rules give
  their final-norm patch tokens (``patch_tokens``).

:class:`MapTap` registers forward hooks, so one ordinary forward gives both the pooled feature (unchanged)
and the map: ``tap.start()``, ``pooled = net(x)``, ``fmap = tap.read()``. The hooks are bound methods of
the tap, so a deep copy of the network carries a working copy of its tap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError

# torchvision networks that pool with a function call in ``forward``: the module whose output is pooled,
# and what ``forward`` applies to it before pooling.
FUNCTIONAL_POOL = {
    "MobileNetV2": ("features", None),
    "MNASNet": ("layers", None),
    "ShuffleNetV2": ("conv5", None),
    "DenseNet": ("features", F.relu),
}


# Networks whose published dense features are their last map through the norm their pooled output takes
# last: DINOv3's ConvNeXt (transformers' last_hidden_state, the hub's x_norm_patchtokens).
NORMED_MAPS = {"HFConvNeXt": "head.norm"}


def _is_vit(net: nn.Module) -> bool:
    """timm's token networks (VisionTransformer, Eva and their subclasses)."""
    return all(hasattr(net, a) for a in ("blocks", "norm", "num_prefix_tokens", "patch_embed"))


def _global_pool(net: nn.Module) -> str | None:
    """The name of the last global-average-pooling module (timm's SelectAdaptivePool2d first)."""
    from timm.layers import SelectAdaptivePool2d

    for kinds in ((SelectAdaptivePool2d,), (nn.AdaptiveAvgPool2d,)):
        names = [name for name, m in net.named_modules() if isinstance(m, kinds)]
        if names:
            return names[-1]
    return None


class MapTap:
    """Hooks on ``net`` that capture its last feature map (B, C, h, w) during an ordinary forward.

    ``blocks`` > 1 (ViTs only): the last ``blocks`` blocks' normalised tokens concatenated. ``kind`` says
    where the map is read (``vit``, ``torchvision_vit``, ``pool_input``, ``module_output``).
    """

    def __init__(self, net: nn.Module, blocks: int = 1, name: str = "") -> None:
        self.net, self.blocks, self.name = net, blocks, name or type(net).__name__
        self.captured: list[torch.Tensor] = []
        self.active = False  # only between start() and read(): other forwards (k-NN monitoring) keep nothing
        self.input_hw: tuple[int, int] = (0, 0)
        self.post = None
        if _is_vit(net):
            self.kind = "vit"
            if not 1 <= blocks <= len(net.blocks):
                raise UserError(f"--dense_blocks {blocks}: {self.name} has {len(net.blocks)} blocks")
            for block in list(net.blocks)[-blocks:]:
                block.register_forward_hook(self._keep_output)
            net.register_forward_pre_hook(self._keep_input_size)
            return
        if blocks != 1:
            raise UserError(
                f"--dense_blocks {blocks} concatenates a ViT's last blocks; {self.name} is not a ViT: drop "
                "--dense_blocks"
            )
        kind = type(net).__name__
        if kind == "VisionTransformer" and hasattr(net, "encoder") and hasattr(net, "class_token"):  # torchvision
            self.kind = "torchvision_vit"
            net.encoder.register_forward_hook(self._keep_output)
            net.register_forward_pre_hook(self._keep_input_size)
        elif kind in FUNCTIONAL_POOL:
            self.kind = "module_output"
            module, self.post = FUNCTIONAL_POOL[kind]
            net.get_submodule(module).register_forward_hook(self._keep_output)
        elif (pool := _global_pool(net)) is not None:
            self.kind = "pool_input"
            net.get_submodule(pool).register_forward_pre_hook(self._keep_input)
            if kind in NORMED_MAPS:  # the norm's module applied to the map (B, C, h, w), location by location
                self.post = net.get_submodule(NORMED_MAPS[kind])
        else:
            raise UserError(
                f"{self.name} has no feature map that this project can find (no global pooling layer); the dense "
                "objective needs a convolutional network (resnet18, mobilenet_v2, timm/<cnn>, ...) or a ViT"
            )

    # ---------------------------------------------------------------- hooks (bound methods: copied with the net)
    def _keep_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.active:
            self.captured.append(output)

    def _keep_input(self, module: nn.Module, args: tuple) -> None:
        if self.active:
            self.captured.append(args[0])

    def _keep_input_size(self, module: nn.Module, args: tuple) -> None:
        self.input_hw = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    # ---------------------------------------------------------------- use
    def start(self) -> None:
        """Capture the map of the next forward (until :meth:`read`)."""
        self.captured, self.active = [], True

    def read(self) -> torch.Tensor:
        """The map captured by the one forward since :meth:`start`: (B, C, h, w)."""
        want = self.blocks if self.kind == "vit" else 1
        got, self.captured, self.active = self.captured, [], False
        if len(got) != want:
            raise RuntimeError(f"the feature-map hooks of {self.name} fired {len(got)} times, expected {want}")
        if self.kind == "vit":
            return torch.cat([self._grid(self.net.norm(t), self.net.num_prefix_tokens) for t in got], dim=1)
        if self.kind == "torchvision_vit":
            return self._grid(got[0], 1)
        fmap = got[0]
        if getattr(self.net, "output_fmt", "NCHW") == "NHWC":  # timm's Swin-style networks
            fmap = fmap.permute(0, 3, 1, 2)
        return self.post(fmap) if self.post is not None else fmap

    def _grid(self, tokens: torch.Tensor, n_prefix: int) -> torch.Tensor:
        """(B, n_prefix + h*w, D) tokens -> (B, D, h, w) patch grid."""
        patches = tokens[:, n_prefix:]
        h, w = self._grid_size(patches.shape[1])
        return patches.reshape(patches.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def _grid_size(self, n: int) -> tuple[int, int]:
        height, width = self.input_hw
        patch_embed = getattr(self.net, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            h, w = patch_embed.dynamic_feat_size((height, width))
        else:
            p = int(getattr(self.net, "patch_size", 0) or 0) or max(1, round((height * width / n) ** 0.5))
            h, w = height // p, width // p
        if h * w != n:
            raise RuntimeError(f"{self.name}: {n} patch tokens do not form the {h}x{w} grid of {height}x{width} px")
        return int(h), int(w)


@torch.no_grad()
def probe_map(forward, tap: MapTap, like: torch.Tensor | nn.Module, image_size: int) -> tuple[int, int, int]:
    """(channels, h, w) of the map ``tap`` reads when ``forward`` sees one ``image_size`` px image.

    ``like``: a parameter-holding module (or tensor) giving the device and dtype of the probe image; the
    caller puts the network in eval mode (no BatchNorm statistics move).
    """
    ref = like if isinstance(like, torch.Tensor) else next(iter(like.parameters()), torch.zeros(()))
    x = torch.zeros(1, 3, image_size, image_size, device=ref.device, dtype=ref.dtype)
    tap.start()
    forward(x)
    fmap = tap.read()
    return int(fmap.shape[1]), int(fmap.shape[2]), int(fmap.shape[3])
