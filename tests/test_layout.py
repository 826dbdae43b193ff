"""The layout shows the architecture: floors between packages, commands vs libraries, short functions."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = {"train_student", "eval_knn", "eval_linear"}
PACKAGES = ("models", "data", "tools")
MAX_FUNCTION_LINES = 60
MAX_ENTRY_LINES = 400


def project_files() -> list[pathlib.Path]:
    """Every Python file of the project's own code (entry scripts, packages, commands), tests excluded."""
    files = [ROOT / f"{name}.py" for name in sorted(ENTRY_SCRIPTS)] + [ROOT / "hubconf.py"]
    for pkg in PACKAGES:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return [f for f in files if f.exists()]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Dotted names of every absolute import in ``path`` (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_ground_floor_imports_nothing_above_it():
    bad = []
    for path in project_files():
        if rel(path).split("/")[0] in ("models", "data"):
            above = {m for m in imported_modules(path) if m.split(".")[0] in ("tools", *ENTRY_SCRIPTS)}
            bad += [f"{rel(path)} imports {m}" for m in sorted(above)]
    assert not bad, bad


def test_nothing_but_tests_imports_an_entry_script():
    bad = []
    for path in project_files():
        found = {m.split(".")[0] for m in imported_modules(path)} & ENTRY_SCRIPTS
        bad += [f"{rel(path)} imports {m}" for m in sorted(found)]
    assert not bad, bad


def test_bench_is_imported_only_by_commands_and_itself():
    bad = []
    for path in project_files():
        parts = rel(path).split("/")
        is_command = len(parts) == 2 and parts[0] == "tools"
        in_bench = parts[:2] == ["tools", "bench"]
        uses = sorted(m for m in imported_modules(path) if m.startswith("tools.bench"))
        if uses and not (is_command or in_bench):
            bad.append(f"{rel(path)} imports {', '.join(uses)}")
    assert not bad, bad


def test_files_under_tools_are_commands_and_folders_are_libraries():
    commands = sorted((ROOT / "tools").glob("*.py"))
    not_commands = [rel(p) for p in commands if p.name != "__init__.py" and "__main__" not in p.read_text()]
    assert not not_commands, f"files directly under tools/ must be commands (python -m tools.<name>): {not_commands}"
    libraries = [p for p in (ROOT / "tools").iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert {p.name for p in libraries} >= {"engine", "eval", "bench", "teacher_cache", "deploy", "study"}
    runnable = [rel(p) for lib in libraries for p in lib.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()]
    assert not runnable, f"library modules must not be commands: {runnable}"


def test_no_two_modules_share_a_file_name():
    """One name, one job: a reader who meets ``teachers.py`` knows which one is meant."""
    seen: dict[str, list[str]] = {}
    for path in project_files():
        if path.name != "__init__.py":
            seen.setdefault(path.name, []).append(rel(path))
    assert not {name: paths for name, paths in seen.items() if len(paths) > 1}


def test_the_method_reads_in_one_module():
    """Head, student, loss and what a step computes live in models/simreg.py; the step's runner calls it."""
    tree = ast.parse((ROOT / "models" / "simreg.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert {"build_head", "Student", "regression_loss", "distillation_losses"} <= defined
    assert "models.simreg.distillation_losses" in imported_modules(ROOT / "tools" / "engine" / "step.py")


@pytest.mark.parametrize("name", sorted(ENTRY_SCRIPTS))
def test_entry_scripts_read_in_one_sitting(name):
    lines = (ROOT / f"{name}.py").read_text().count("\n")
    assert lines < MAX_ENTRY_LINES, f"{name}.py has {lines} lines"


def test_no_function_is_over_sixty_lines():
    long = []
    for path in project_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel(path)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


OPTIONAL_AT_RUN_TIME = ("faiss", "nvidia.dali")  # absent from many GPU images: used only when present


def test_every_module_imports_without_the_optional_packages():
    """Each project module imports on a machine without faiss or NVIDIA DALI (they are looked up when used)."""
    modules = [rel(p)[:-3].replace("/", ".").removesuffix(".__init__") for p in project_files()]
    code = (
        "import importlib, sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if any(name == m or name.startswith(m + '.') for m in {OPTIONAL_AT_RUN_TIME!r}):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Absent())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"assert not [m for m in sys.modules if m in {OPTIONAL_AT_RUN_TIME!r}]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_library_code_never_reads_args():
    """Functions in the packages take plain values; only command modules and entry scripts see ``args``."""
    bad = []
    for path in project_files():
        parts = rel(path).split("/")
        boundary = len(parts) == 1 or (len(parts) == 2 and parts[0] == "tools") or rel(path) == "tools/eval/common.py"
        if boundary:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                bad.append(f"{rel(path)}:{node.lineno} args.{node.attr}")
    assert not bad, bad
