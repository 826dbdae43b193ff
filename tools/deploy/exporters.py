"""A frozen network as files other tools read: state dicts, safetensors, ONNX, TorchScript.

Every exporter takes an :class:`~models.pretrained.EvalModel` (float images in [0, 1], (B, 3, H, W) ->
features (B, D); its normalisation inside) and returns the file's bytes together with a check made
before anything is written: the exported network, rebuilt from those bytes by the tool that will read
them (torchvision, timm, onnxruntime, ``torch.jit.load``, safetensors), is compared with the PyTorch
network on random images. An export that disagrees by more than :data:`REL_LIMIT` of the largest
feature is refused, so a file that computes something else is never written.

- ``torchvision`` / ``timm``: the backbone's state dict, loadable strictly into
  ``torchvision.models.<arch>()`` (only the classifier missing) or ``timm.create_model(name,
  num_classes=0)``; these networks expect *normalised* input, the mean/std are in the export record.
- ``safetensors``: the backbone's tensors under their torchvision / timm names (with the prediction
  head: the authors' ``encoder_q.module.*`` / ``predict_q.module.*`` layout, which the evaluation reads
  with ``--use_pred``), the architecture and normalisation in the header.
- ``onnx`` / ``torchscript``: the whole network, normalisation inside, a dynamic batch axis.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.backbones import NO_AUX, TIMM_PREFIX, build_timm, innermost_encoder, is_timm_arch
from models.errors import UserError
from models.io import load_strict
from models.pretrained import EvalModel
from tools.deploy.optional import require

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchvision", "timm", "safetensors", "onnx", "torchscript")
STATE_DICT_FORMATS = ("torchvision", "timm")
REL_LIMIT = 1e-4  # max |exported - PyTorch| over max |PyTorch|, on the check images
TRACE_BATCH = 2  # the batch the graph is traced with; the check uses others, so the batch axis must be dynamic
CHECK_BATCHES = (1, 3)


@dataclass
class Agreement:
    """How far the exported network's outputs are from PyTorch's on the check images."""

    max_abs: float
    max_rel: float  # max_abs / max |PyTorch output|
    against: str  # what computed the exported side (onnxruntime, torch.jit.load, torchvision, ...)
    batches: tuple[int, ...]
    image_size: int

    def summary(self) -> str:
        if not self.batches:  # a file of tensors: compared tensor by tensor
            return f"{self.against}: every tensor reads back identical"
        sizes = ", ".join(map(str, self.batches))
        return (
            f"{self.against} vs PyTorch on batches of {sizes} random {self.image_size} px images: max abs difference "
            f"{self.max_abs:.3g}, relative {self.max_rel:.3g} (limit {REL_LIMIT:g})"
        )


@dataclass
class Exported:
    """A file's bytes and the check they passed."""

    payload: bytes
    agreement: Agreement


# ---------------------------------------------------------------- the network's parts
def normalisation(model: nn.Module) -> dict | None:
    """The input mean/std the network applies inside (None: it takes [0, 1] pixels as they are)."""
    norm = innermost_encoder(model).normalize
    if not norm.enabled:
        return None
    return {k: [round(v, 6) for v in getattr(norm, k).flatten().tolist()] for k in ("mean", "std")}


def backbone_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict (torchvision or timm names, no classifier), as detached contiguous copies."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in innermost_encoder(model).backbone.state_dict().items()}


def check_images(image_size: int, batches: tuple[int, ...] = CHECK_BATCHES, seed: int = 0) -> list[torch.Tensor]:
    """Random float images in [0, 1], one (B, 3, S, S) tensor per batch size (seeded: the same every run)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, image_size, image_size, generator=g) for b in batches]


def run_reference(model: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """PyTorch's outputs (B, D); a network that cannot take this image size is a one-sentence error."""
    model.eval()
    try:
        with torch.no_grad():
            return [model(x).float() for x in images]
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"the network does not take {images[0].shape[-1]} px images ({first}); choose another --image_size"
        ) from exc


def measure(
    model: nn.Module, exported: Callable, against: str, image_size: int, batches: tuple[int, ...] = CHECK_BATCHES
) -> Agreement:
    """Compare ``exported(x)`` with ``model(x)`` on :func:`check_images`; refuse beyond :data:`REL_LIMIT`."""
    images = check_images(image_size, batches)
    refs = run_reference(model, images)
    with torch.no_grad():
        outs = [torch.as_tensor(exported(x)).float() for x in images]
    max_abs = max(float((o - r).abs().max()) for o, r in zip(outs, refs, strict=True))
    scale = max(float(r.abs().max()) for r in refs)
    found = Agreement(max_abs, max_abs / max(scale, 1e-12), against, batches, image_size)
    if not found.max_rel <= REL_LIMIT:  # also catches NaN
        raise UserError(f"the export does not compute the network's features: {found.summary()}; nothing was written")
    return found


# ---------------------------------------------------------------- state dicts for torchvision and timm
def _replace_with_identity(net: nn.Module, name: str) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, nn.Identity())


def _torchvision_net(arch: str, sd: dict[str, torch.Tensor]) -> nn.Module:
    """``torchvision.models.<arch>()`` holding ``sd``, its classifier (the last Linear) replaced by the identity."""
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(
            f"{arch} is not a torchvision architecture, so --format torchvision cannot hold it; "
            "use --format safetensors, onnx or torchscript" + (" (or timm)" if is_timm_arch(arch) else "")
        )
    net = torchvision.models.get_model(arch, weights=None, **NO_AUX.get(arch, {}))
    classifier = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    try:
        result = net.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shapes that differ
        last = str(exc).strip().splitlines()[-1][:160]
        raise UserError(f"the {arch} weights do not fit torchvision's {arch}: {last}") from exc
    expected = {f"{classifier}.weight", f"{classifier}.bias"}
    if result.unexpected_keys or set(result.missing_keys) != expected:
        raise UserError(
            f"the weights do not load into torchvision's {arch} with only its classifier missing (missing "
            f"{sorted(set(result.missing_keys) - expected)[:4]}, unexpected {result.unexpected_keys[:4]})"
        )
    _replace_with_identity(net, classifier)
    return net


def _timm_net(arch: str, sd: dict[str, torch.Tensor]) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` holding ``sd`` strictly (``timm/<name>`` or a same-named model).

    Built as the project builds timm students (:func:`models.backbones.build_timm`: ViTs take any
    size their patch divides); the state dict is the same as ``timm.create_model(name, num_classes=0)``'s.
    """
    require(("timm",), "--format timm")
    import timm

    name = arch[len(TIMM_PREFIX) :] if is_timm_arch(arch) else arch
    if not timm.is_model(name):
        raise UserError(
            f"timm has no model named '{name}' to hold this {arch}; use --format torchvision, safetensors, onnx or "
            "torchscript"
        )
    net = build_timm(TIMM_PREFIX + name)
    load_strict(net, sd, arch, f"timm {name}")
    return net


def export_state_dict(model: EvalModel, fmt: str, image_size: int) -> Exported:
    """The backbone's state dict for ``torchvision`` or ``timm``, checked by rebuilding that library's network.

    The rebuilt network gets the images after the encoder's own normalisation (what a user of the file
    applies), so a network of another kind under the same names (BYOL's "SAME" padding) is refused.
    """
    if model.head is not None:
        raise UserError(
            f"--format {fmt} holds a backbone only ({fmt} has no slot for the prediction head); use --format "
            "safetensors, onnx or torchscript with --with_head"
        )
    sd = backbone_weights(model)
    net = (_torchvision_net if fmt == "torchvision" else _timm_net)(model.arch, sd).eval()
    norm = innermost_encoder(model).normalize
    # One batch: a state dict has no batch axis to prove dynamic.
    agreement = measure(model, lambda x: net(norm(x)), f"{fmt} network", image_size, CHECK_BATCHES[-1:])
    buf = io.BytesIO()
    torch.save(sd, buf)
    return Exported(buf.getvalue(), agreement)


# ---------------------------------------------------------------- safetensors
def safetensors_layout(model: EvalModel) -> dict[str, torch.Tensor]:
    """Plain backbone names; with a head, the authors' layout the evaluation reads with ``--use_pred``."""
    sd = backbone_weights(model)
    if model.head is None:
        return sd
    head = {k: v.detach().cpu().contiguous().clone() for k, v in model.head.state_dict().items()}
    out = {f"encoder_q.module.{k}": v for k, v in sd.items()}
    return {**out, **{f"predict_q.module.{k}": v for k, v in head.items()}}


def export_safetensors(model: EvalModel, metadata: dict) -> Exported:
    """The tensors in a safetensors file (``metadata`` in its header), read back and compared bit for bit."""
    require(("safetensors",), "--format safetensors")
    from safetensors.torch import load, save

    tensors = safetensors_layout(model)
    payload = save(tensors, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    back = load(payload)
    same = set(back) == set(tensors) and all(
        back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items()
    )
    if not same:
        raise UserError("the safetensors file does not read back the same tensors; nothing was written")
    return Exported(payload, Agreement(0.0, 0.0, "safetensors.torch.load", (), 0))


# ---------------------------------------------------------------- ONNX and TorchScript
CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, INFO logs and deprecation warnings (the check says what matters)."""
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _failed(what: str, exc: BaseException) -> UserError:
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    return UserError(f"{what} failed: {first}; try another --format (or --debug for the traceback)")


def export_onnx(model: EvalModel, image_size: int, opset: int | None = None) -> Exported:
    """The network as ONNX: input ``images`` (batch, 3, S, S) in [0, 1], output ``features``; checked in onnxruntime."""
    require(("onnx", "onnxscript", "onnxruntime"), "--format onnx")
    import onnx
    import onnxruntime

    x = check_images(image_size, (TRACE_BATCH,), seed=1)[0]
    run_reference(model, [x])
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            program = torch.onnx.export(
                model, (x,), dynamo=True, input_names=["images"], output_names=["features"],
                dynamic_shapes=({0: batch},), **({"opset_version": opset} if opset else {}),
            )  # fmt: skip
            proto = program.model_proto
            onnx.checker.check_model(proto)
            payload = proto.SerializeToString()
    except Exception as exc:  # whatever the exporter trips on, one sentence (the traceback with --debug)
        raise _failed("ONNX export", exc) from exc
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    run = lambda images: session.run(None, {"images": images.numpy()})[0]
    return Exported(payload, measure(model, run, f"onnxruntime {onnxruntime.__version__}", image_size))


def export_torchscript(model: EvalModel, image_size: int) -> Exported:
    """The network traced to TorchScript, checked after ``torch.jit.load`` of the saved bytes."""
    x = check_images(image_size, (TRACE_BATCH,), seed=1)[0]
    run_reference(model, [x])
    try:
        with _quiet():
            traced = torch.jit.trace(model, x, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
            loaded = torch.jit.load(io.BytesIO(buf.getvalue()), map_location="cpu")
    except Exception as exc:  # whatever tracing trips on, one sentence (the traceback with --debug)
        raise _failed("TorchScript tracing", exc) from exc
    with _quiet():
        return Exported(buf.getvalue(), measure(model, loaded, "torch.jit.load", image_size))


# ---------------------------------------------------------------- what a file holds
def export_record(model: EvalModel, fmt: str, out: str, agreement: Agreement, image_size: int) -> dict:
    """The JSON written beside an export: its source, network, input contract and check."""
    whole_network = fmt in ("onnx", "torchscript")
    ident = model.identity
    return {
        "file": os.path.basename(out),
        "format": fmt,
        "source": {k: ident.get(k) for k in ("weights", "weights_sha256", "format", "kind", "epoch")},
        "arch": model.arch,
        "output": "prediction head" if model.head is not None else "backbone feature",
        "head": ident.get("use_pred") if model.head is not None else None,
        "feat_dim": int(model.feat_dim),
        "input": {
            "dtype": "float32",
            "layout": "(batch, 3, height, width), RGB",
            "range": [0.0, 1.0],  # then, unless normalisation_inside, (x - mean) / std as below
            "shape": ["batch", 3, image_size, image_size] if whole_network else None,
            "normalisation": normalisation(model),
            "normalisation_inside": whole_network,
        },
        "check": {**asdict(agreement), "limit_rel": REL_LIMIT},
        "torch": torch.__version__,
    }
