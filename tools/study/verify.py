"""Checking the study against its records: one seed of the selected rows retrained from scratch here.

What reproduces where (measured: see docs on the small-scale study):
- on the CPU kind and torch build that recorded the numbers (``summary.json``'s ``machine``), every number is
  reproduced exactly: the runs use one thread, fixed seeds and deterministic kernels;
- on another CPU kind (vendor, AVX2 / AVX-512 / AMX, another torch) the kernels sum in another order and
  float32 rounding grows over a training run, the demo teachers included (they are retrained by the check),
  so the numbers move. What must still hold there is the spread: every rerun number within the recorded
  seeds' mean ± 3 std (with a floor, :data:`FLOOR`), and the check reports whether the row's conclusion on
  the rerun seed agrees with the recorded one.

The recorded numbers of a run come from its own ``runs/<config>/seed<S>/result.json`` when the grid ran
in this folder, else from ``summary.json`` alone (a fresh clone has only that).
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from dataclasses import replace

from models.errors import UserError
from models.io import read_json, write_json
from tools.study.grid import RunConfig
from tools.study.report import METRICS, SEG_METRICS, machine, verdict
from tools.study.runner import RESULT, Study, prepare_teacher, run_student

SIGMAS = 3.0  # the band: the recorded seeds' mean +- 3 std ...
FLOOR = {"loss": 0.01}  # ... and at least this wide (accuracies: 1 point), so a 0-std number is not a point
ACCURACY_FLOOR = 1.0
SAME_KIND = ("cpu", "avx2", "avx512f", "torch")  # what must agree for the exact numbers to be expected


def numbers(result: dict) -> dict[str, float]:
    """A run's result (``result.json``) as flat numbers: ``backbone.knn1``, ..., ``pred.linear``, ``loss``."""
    out = {f"{part}.{m}": result[part][m] for part in ("backbone", "pred") if part in result
           for m in (*METRICS, *SEG_METRICS) if m in result[part]}  # fmt: skip
    if "loss" in result.get("losses", {}):
        out["loss"] = result["losses"]["loss"]
    return out


def from_summary(summary: dict, run_key: str) -> dict[str, dict[str, float]]:
    """{seed: flat numbers} of one run from ``summary.json`` (its backbone and head variants merged)."""
    per_seed: dict[str, dict[str, float]] = {}
    for row in summary.get("rows", []):
        for v in row["variants"]:
            if v["run"] != run_key:
                continue
            part = "pred" if v["use_pred"] else "backbone"
            for seed, nums in v["per_seed"].items():
                got = per_seed.setdefault(seed, {})
                got.update({f"{part}.{m}": nums[m] for m in (*METRICS, *SEG_METRICS) if m in nums})
                if part == "backbone" and "loss" in nums:
                    got["loss"] = nums["loss"]
    return per_seed


def band(values: list[float], name: str) -> tuple[float, float]:
    """The recorded seeds' mean +- :data:`SIGMAS` sample std, at least +- the metric's floor."""
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    half = max(SIGMAS * std, FLOOR.get(name, ACCURACY_FLOOR))
    return mean - half, mean + half


def compare(recorded: dict[str, float], rerun: dict[str, float], seeds: dict[str, dict[str, float]]) -> dict:
    """Per number: recorded, rerun, exact or not, and the band of the recorded seeds with in/out."""
    out = {}
    for name, want in recorded.items():
        got = rerun.get(name)
        values = [s[name] for s in seeds.values() if name in s] or [want]
        lo, hi = band(values, name)
        out[name] = {"recorded": want, "rerun": got, "exact": got == want, "band": [round(lo, 4), round(hi, 4)],
                     "within_band": got is not None and lo <= got <= hi}  # fmt: skip
    return out


def same_machine_kind(recorded: dict, here: dict) -> bool:
    """Whether this machine is the CPU kind and torch build the numbers were recorded on."""
    return all(recorded.get(k) == here.get(k) for k in SAME_KIND)


def recorded_of(study: Study, summary: dict, run: RunConfig, seed: int) -> tuple[dict, dict]:
    """(this seed's recorded numbers, {seed: numbers} of every recorded seed) of ``run``."""
    seeds = from_summary(summary, run.key())
    own = read_json(os.path.join(study.run_dir(run, seed), RESULT))
    recorded = numbers(own) if own is not None else seeds.get(str(seed))
    if not recorded:
        raise UserError(
            f"seed {seed} of {run.key()} is recorded neither in {study.run_dir(run, seed)} nor in "
            f"{os.path.join(study.out, 'summary.json')}; run the grid (or pick a recorded seed) before verifying it"
        )
    return recorded, seeds or {str(seed): recorded}


def conclusions(summary: dict, reruns: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Each recorded row whose runs were all rerun: its recorded verdict's first word beside the verdict the
    rerun seed gives (its numbers as the means, the recorded stds kept)."""
    out = {}
    for row in summary.get("rows", []):
        if row["name"] == "student" or not all(v["run"] in reruns for v in row["variants"]):
            continue  # the student row's verdict needs the random-init references, not rerun here
        variants = []
        for v in row["variants"]:
            part = "pred" if v["use_pred"] else "backbone"
            mean = {m: reruns[v["run"]].get(f"{part}.{m}", float("nan")) for m in (*METRICS, *SEG_METRICS)
                    if m in v["mean"]}  # fmt: skip
            variants.append({**v, "mean": {**v["mean"], **mean}})
        rerun_verdict = verdict({**row, "variants": variants}, summary.get("references", {}))
        out[row["name"]] = {"recorded": row.get("verdict", ""), "rerun_seed": rerun_verdict,
                            "agrees": rerun_verdict.split(":")[0] == row.get("verdict", "").split(":")[0]}  # fmt: skip
    return out


def recorded_machines(summary: dict, keys: set[str]) -> list[dict]:
    """The machines that recorded the runs ``keys``: each row's own (the dense row ran elsewhere) or the grid's."""
    rows = [row for row in summary.get("rows", []) if any(v["run"] in keys for v in row["variants"])]
    return [m for m in (row.get("machine", summary.get("machine")) for row in rows) if m]


def verify_seed(study: Study, runs: list[RunConfig], pred_runs: set[RunConfig], seed: int) -> dict:
    """Retrain ``seed`` of ``runs`` from scratch in ``OUT/verify`` and check it against the records.

    Exact equality is required on the recording machine's kind; elsewhere every number must fall within
    its band. Returns the record also written to ``OUT/verify.json``; ``ok`` says whether the check passed.
    """
    summary = read_json(os.path.join(study.out, "summary.json")) or {}
    recorded = {run.key(): recorded_of(study, summary, run, seed) for run in runs}
    here = machine()
    kinds = recorded_machines(summary, {run.key() for run in runs}) or [summary.get("machine", here)]
    exact_expected = all(same_machine_kind(kind, here) for kind in kinds)
    for name in sorted({t for r in runs for t in r.teachers}):
        prepare_teacher(study, study.teachers[name])  # a fresh clone retrains the demo teachers here
    fresh = replace(study, runs_folder="verify", _eval_lock=threading.Lock())
    out, reruns = {}, {}
    for run in runs:
        shutil.rmtree(fresh.run_dir(run, seed), ignore_errors=True)
        reruns[run.key()] = numbers(run_student(fresh, run, seed, run in pred_runs))
        want, seeds = recorded[run.key()]
        checked = compare(want, reruns[run.key()], seeds)
        exact = all(c["exact"] for c in checked.values())
        within = all(c["within_band"] for c in checked.values())
        out[run.key()] = {"exact": exact, "within_band": within, "ok": exact or (within and not exact_expected),
                          "numbers": checked}  # fmt: skip
    record = {"seed": seed, "machine": here, "recorded_machine": summary.get("machine"),
              "exact_expected": exact_expected, "ok": all(r["ok"] for r in out.values()), "runs": out,
              "conclusions": conclusions(summary, reruns)}  # fmt: skip
    write_json(os.path.join(study.out, "verify.json"), record)
    return record
