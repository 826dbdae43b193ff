"""The small-scale study's grid: which training runs answer which of the paper's questions.

A *run* is one student training (its configuration and seed); a *row* is one question, whose variants
each point at a run and say how to evaluate it (backbone features, or the prediction head's output).
Variants with the same training configuration share one run: the paper's setting (4-layer head,
single weak view, live teacher, the default student) appears in every row but is trained once per seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from models.errors import UserError
from models.simreg import OBJECTIVES

VIEWS = {  # train_student.py's view flags per view mode (neither flag: two independent strong views)
    "single_weak": ["--single_aug", "--weak_weak"],
    "weak_weak": ["--weak_weak"],
    "weak_strong": ["--weak_strong"],
    "strong_strong": [],
}
CACHES = ("live", "centre", "kview")


@dataclass(frozen=True)
class Scale:
    """The small-scale recipe every run shares (the study's command line can change each)."""

    student: str = "timm/resnet10t"  # 2.4x ResNet-18's training rate at 32 px on 2 CPU cores
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.05
    image_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_epochs: int = 6  # the demo teachers: supervised, AdamW (the demo's recipe)
    teacher_lr: float = 0.002
    probe_epochs: int = 40
    # the dense row: the segmentation demo (python -m data.demo --seg), large enough for a map of 2 x 2 cells
    dense_size: int = 64  # distillation crops and k-NN; a stride-32 network's map is 2 x 2
    seg_size: int = 128  # the segmentation probe's input: 4 x 4 maps
    dense_epochs: int = 8
    dense_teacher_epochs: int = 10  # teacher S: supervised on the large digit of each image
    seg_probe_epochs: int = 10


@dataclass(frozen=True)
class RunConfig:
    """One student training: everything that changes its weights except the seed."""

    student: str
    head: int = 4
    views: str = "single_weak"
    cache: str = "live"
    teachers: tuple[str, ...] = ("A",)
    loss: str = "global"  # train_student.py --loss
    data: str = "digits"  # digits: the study's data; segdemo: the segmentation demo of the dense row

    def key(self) -> str:
        """A short, stable folder name for this configuration (the fields added later count only when set, so
        earlier configurations keep their folders)."""
        fields = {k: v for k, v in asdict(self).items() if (k, v) not in (("loss", "global"), ("data", "digits"))}
        text = json.dumps(fields, sort_keys=True)
        tag = f"{self.student.replace('/', '_')}-h{self.head}-{self.views}-{self.cache}-{'+'.join(self.teachers)}"
        tag += "" if self.loss == "global" and self.data == "digits" else f"-{self.loss}-{self.data}"
        return f"{tag}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class Variant:
    """One bar of a row: a run and how its student is evaluated."""

    label: str
    run: RunConfig
    use_pred: bool = False  # evaluate the prediction head's output instead of the backbone's features


@dataclass(frozen=True)
class Row:
    """One question of the paper, its variants (the paper's choice first) and the claim being tested."""

    name: str
    question: str
    claim: str
    variants: tuple[Variant, ...] = field(default_factory=tuple)


def rows(scale: Scale) -> list[Row]:
    """The study's rows; the first variant of each row is the paper's setting unless the row says otherwise."""
    paper = RunConfig(student=scale.student)
    s = scale.student

    def dense(loss: str) -> RunConfig:  # teacher S on the segmentation demo, at scale.dense_size
        return RunConfig(student=s, teachers=("S",), loss=loss, data="segdemo")

    return [
        Row("head", "prediction head depth", "the 4-layer MLP head beats 2 layers and a linear predictor",
            (Variant("4 layers (paper)", paper), Variant("2 layers", replace(paper, head=2)),
             Variant("linear", replace(paper, head=0)))),
        Row("views", "augmentation of teacher and student views",
            "one weakly augmented view for both networks works best",
            (Variant("single weak (paper)", paper),
             Variant("weak / weak, independent", replace(paper, views="weak_weak")),
             Variant("weak teacher / strong student", replace(paper, views="weak_strong")),
             Variant("strong / strong", replace(paper, views="strong_strong")))),
        Row("teacher", "live teacher or cached teacher features",
            "a centre-crop feature cache costs little accuracy; an exact K-view cache matches the live teacher",
            (Variant("live (paper)", paper), Variant("centre-crop cache", replace(paper, cache="centre")),
             Variant("K-view exact cache", replace(paper, cache="kview")))),
        Row("two_teachers", "two teachers at once against each alone",
            "one student with a head per teacher learns from both (the paper distils one teacher)",
            (Variant("teacher A alone (paper)", paper), Variant("teacher B alone", replace(paper, teachers=("B",))),
             Variant("A + B, a head each", replace(paper, teachers=("A", "B"))))),
        Row("features", "backbone features or the prediction head's output",
            "the backbone (head dropped) is the better representation, though only the head mimics the teacher",
            (Variant("backbone (paper)", paper), Variant("prediction head output", paper, use_pred=True))),
        Row("student", "student architecture", "distillation works for other student networks",
            (Variant(f"{s} (the grid's default)", paper),
             *(Variant(a, replace(paper, student=a)) for a in ("resnet18", "mobilenet_v2") if a != s))),
        Row("dense", "pooled feature, feature map or both (segmentation demo)",
            "regressing the teacher's feature map (--loss dense) gives a better segmentation probe than the pooled "
            "feature (the paper's global loss); both keeps the global loss's 1-NN",
            tuple(Variant(f"{loss}{' (paper)' if loss == 'global' else ''}", dense(loss)) for loss in OBJECTIVES)),
    ]  # fmt: skip


def select_rows(all_rows: list[Row], only: list[str] | None) -> list[Row]:
    """The rows named by ``--only`` (all when None), in the grid's order."""
    if not only:
        return all_rows
    names = [r.name for r in all_rows]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UserError(f"--only {unknown[0]!r} is not a row of the study; choose from {', '.join(names)}")
    return [r for r in all_rows if r.name in only]


def runs_of(selected: list[Row]) -> list[RunConfig]:
    """The distinct training configurations the rows need, in first-use order (shared runs once)."""
    out: list[RunConfig] = []
    for row in selected:
        for v in row.variants:
            if v.run not in out:
                out.append(v.run)
    return out


def teachers_of(selected: list[Row]) -> list[str]:
    """The teacher names the selected rows use, in order (A first)."""
    return sorted({t for run in runs_of(selected) for t in run.teachers})


def students_of(selected: list[Row], data: str = "digits") -> list[str]:
    """The student architectures the selected rows train on ``data`` (their random-init baselines are evaluated)."""
    return sorted({run.student for run in runs_of(selected) if run.data == data})
