"""Hours for the paper's runs from a benchmark's rows: which bound applies, on 1 and 8 GPUs.

The model, per GPU:
- GPU step: the fastest of our measured steps for the run (``step.*`` for R50 -> R18 live,
  ``cached.mmap`` for R50 -> R18 cached, ``cached.x4_r50`` for SimCLR-x4 -> R50 cached), times a DDP
  efficiency for several GPUs (an assumption: gradient all-reduce of the student overlaps the backward);
- CPU decoding (``--decode cpu``): the loader's rate is the measured per-core rate (``data.cpu``) times the
  host cores each GPU gets; the run goes at ``min(step, loader)``, and the smaller names the bound;
- GPU decoding (``--decode gpu``): the workers only read bytes, and the prefetch thread decodes batch
  t + 1 on the GPU while step t runs; both share the GPU, and the model adds their times,
  ``1 / (1 / step + 1 / decode)``, with ``decode`` the measured loader-plus-decoding rate
  (``e2e.gpu_loader``): a lower bound where nvJPEG's hardware engine overlaps the step.
Hours = 130 epochs x 5,004 steps x 256 images / (rate per GPU x GPUs). For one GPU the end-to-end rows
measured with the benchmark's 16 workers (``e2e.cpu``, ``e2e.gpu``) check the model.

The ``hours`` profile of ``python -m tools.benchmark`` runs it on rows written earlier (``--rows``: a
``gpu`` profile's rows, and a ``main_job`` profile's, whose ``train_*`` rates it lists too).
"""

from __future__ import annotations

from dataclasses import dataclass

EPOCHS = 130
EPOCH_IMAGES = 5004 * 256  # ImageNet-1k's 1,281,167 train images in full global batches of 256 (drop_last)
# The original release: ~26 min per epoch on 4 RTX 2080 Ti, R50 -> R18 live (reference.md, section 3).
ANCHOR = {"what": "original release, R50 -> R18 live, 4x RTX 2080 Ti", "minutes_per_epoch": 26.0}
RUNS = (
    ("R50 -> R18, live teacher", ("step.fp32", "step.bf16", "step.compiled")),
    ("R50 -> R18, cached teacher", ("cached.mmap",)),
    ("SimCLR-x4 -> R50, cached teacher", ("cached.x4_r50",)),
)


@dataclass(frozen=True)
class Assumptions:
    """What the projection does not measure."""

    cores_per_gpu: int = 16  # loader cores per GPU (a DGX H100 has 112 cores for 8 GPUs; the benchmark host 16)
    ddp_efficiency: float = 0.9  # per-GPU step rate on several GPUs relative to one
    gpus: tuple[int, ...] = (1, 8)


def hours(images_per_s: float) -> float:
    """Hours for the paper's 130 epochs at ``images_per_s`` in total."""
    return EPOCHS * EPOCH_IMAGES / images_per_s / 3600


def anchor_hours() -> float:
    return EPOCHS * ANCHOR["minutes_per_epoch"] / 60


def rates(rows: list[dict]) -> dict[str, float]:
    """``key -> img_s`` of the measured rows (skipped and failed rows left out)."""
    return {r["key"]: r["img_s"] for r in rows if r.get("img_s") and r.get("key")}


def project(rows: list[dict], a: Assumptions = Assumptions()) -> list[dict]:
    """One projection per (run, GPU count, decoding) the rows allow; see the module docstring."""
    rate = rates(rows)
    per_core = next((r["img_s_per_core"] for r in rows if r.get("key") == "data.cpu" and r.get("img_s")), None)
    out = []
    for run, keys in RUNS:
        measured = [rate[k] for k in keys if k in rate]
        if not measured:
            continue
        for n in a.gpus:
            step = max(measured) * (1.0 if n == 1 else a.ddp_efficiency)
            row = {"run": run, "gpus": n, "step_per_gpu": step}
            if per_core:
                loader = per_core * a.cores_per_gpu
                total = min(step, loader) * n
                bound = "GPU step" if step <= loader else "CPU decoding"
                out.append({**row, "decode": "cpu", "loader_per_gpu": loader, "bound": bound, "images_per_s": total,
                            "hours": hours(total)})  # fmt: skip
            if "e2e.gpu_loader" in rate:
                decode = rate["e2e.gpu_loader"]
                total = n / (1 / step + 1 / decode)
                out.append({**row, "decode": "gpu", "loader_per_gpu": decode, "bound": "GPU (step + decoding)",
                            "images_per_s": total, "hours": hours(total)})  # fmt: skip
    return out


def table(projections: list[dict], rows: list[dict], a: Assumptions, main_job: list[dict] | None = None) -> str:
    """The projection as a Markdown section."""
    rate, info = rates(rows), (rows[0] if rows else {})
    lines = [
        f"Projection from {info.get('device', '?')}, torch {info.get('torch', '?')}, {info.get('date', '?')} "
        f"({info.get('profile', '?')} profile); {a.cores_per_gpu} loader cores per GPU, DDP efficiency "
        f"{a.ddp_efficiency:.0%} on several GPUs (assumptions).",
        "",
        "| run | GPUs | decoding | step /s per GPU | loader /s per GPU | bound | images/s | hours (130 epochs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in projections:
        cells = [p["run"], p["gpus"], p["decode"], f"{p['step_per_gpu']:.0f}", f"{p['loader_per_gpu']:.0f}",
                 p["bound"], f"{p['images_per_s']:.0f}", f"{p['hours']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    for key, what in (("e2e.cpu", "CPU decoding"), ("e2e.gpu", "GPU decoding")):
        if key in rate:
            lines.append(f"- Measured end to end on 1 GPU with {what} (benchmark, {info.get('cpu_cores', '?')} "
                         f"cores): {rate[key]:.0f} images/s = {hours(rate[key]):.1f} h.")  # fmt: skip
    for r in main_job or []:
        if r.get("images_per_s") and r["stage"].startswith("train"):
            rate_s = r["images_per_s"]
            lines.append(f"- `train_student.py` ({r['stage']}, --decode {r.get('decode')}): {rate_s:.0f} images/s "
                         f"(median epoch after the first) = {hours(rate_s):.1f} h on 1 GPU.")  # fmt: skip
    lines.append(f"- Anchor: {ANCHOR['what']}, {ANCHOR['minutes_per_epoch']:.0f} min per epoch = "
                 f"{anchor_hours():.1f} h for 130 epochs ({EPOCH_IMAGES / ANCHOR['minutes_per_epoch'] / 60:.0f} "
                 "images/s).")  # fmt: skip
    return "\n".join(lines) + "\n"


# ============ as a benchmark profile ============
def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(benchmark rows, main-job rows) of the rows read with ``--rows``."""
    job = [r for r in rows if str(r.get("profile", "")).startswith("main_job")]
    return [r for r in rows if r not in job], job


def assumptions(p) -> Assumptions:
    return Assumptions(cores_per_gpu=p.cores_per_gpu, ddp_efficiency=p.ddp_efficiency)


def stage_hours(p, ctx) -> list[dict]:
    """One row per projection (run, GPUs, decoding) from the rows read."""
    bench, _ = split_rows(ctx.inputs)
    return [{"config": f"{r['run']}, {r['gpus']} GPU(s), --decode {r['decode']}", "key": f"hours.{i}", **r}
            for i, r in enumerate(project(bench, assumptions(p)))]  # fmt: skip


def format_hours_table(rows: list[dict], p, ctx) -> str:
    """The projection as the Markdown section BENCHMARKS.md takes."""
    bench, job = split_rows(ctx.inputs)
    return table(rows, bench, assumptions(p), job)
