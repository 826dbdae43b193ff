"""The documentation holds together: every relative link and #anchor of README.md, BENCHMARKS.md and docs/*.md
resolves (anchors by GitHub's heading rules), README.md stays short and maps every page of docs/, its test
command is the one CI runs, and the study's section is what the generator writes from summary.json."""

from __future__ import annotations

import pathlib
import re
from urllib.parse import unquote

from models.io import read_json
from tools.study import report

ROOT = pathlib.Path(__file__).resolve().parent.parent
README_MAX_LINES = 300
TEST_COMMAND = 'python -m pytest -q -m "slow or not slow" -n 2'

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def doc_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The Markdown files whose links are checked: those at the top level and under docs/."""
    return sorted(root.glob("*.md")) + sorted((root / "docs").glob("*.md"))


def prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans (a link or heading there is not one)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: pathlib.Path, root: pathlib.Path) -> list[str]:
    """'file: target (why)' for every relative link of ``path`` whose file or anchor does not exist."""
    problems = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...: not checked here
            continue
        file_part, _, anchor = unquote(target).partition("#")
        if not file_part:
            dest = path
        elif file_part.startswith("/"):
            dest = root / file_part.lstrip("/")
        else:
            dest = path.parent / file_part
        where = f"{path.relative_to(root).as_posix()}: {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where} (no heading with this anchor)")
    return problems


def test_every_relative_link_and_anchor_resolves():
    files = doc_files(ROOT)
    assert ROOT / "README.md" in files and len(files) > 5
    problems = [p for f in files for p in broken_links(f, ROOT)]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    page = "# Page A\n\n## Teachers, and `--teacher_fc`: the flag\n## Notes\n## Notes\n"
    (tmp_path / "docs" / "a.md").write_text(page)
    (tmp_path / "README.md").write_text(
        "# Top\n"
        "[ok](docs/a.md) [ok](docs/a.md#teachers-and---teacher_fc-the-flag) [ok](docs/a.md#notes-1) [ok](#top)\n"
        "![ok](docs/a.md) [web](https://example.org/nowhere.md#x) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#teachers) [bad self](#bottom) [third](docs/a.md#notes-2)\n"
    )
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md: docs/b.md (no such file)",
        "README.md: docs/a.md#teachers (no heading with this anchor)",
        "README.md: #bottom (no heading with this anchor)",
        "README.md: docs/a.md#notes-2 (no heading with this anchor)",
    ]
    assert broken_links(tmp_path / "docs" / "a.md", tmp_path) == []


def test_slugs_follow_githubs_rules():
    assert slug("The demo at 32 px (`bash run.sh`, by hand)") == "the-demo-at-32-px-bash-runsh-by-hand"
    assert slug("One NVIDIA H100 / H200 (16 cores): to be filled") == "one-nvidia-h100--h200-16-cores-to-be-filled"
    assert slug("Architecture: `--arch_teacher`") == "architecture---arch_teacher"
    assert slug("See [the cache](caches.md) now") == "see-the-cache-now"


def test_readme_is_short_and_maps_every_page_of_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert pages and [p for p in pages if f"](docs/{p})" not in text] == []


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert TEST_COMMAND in readme  # on a line of its own, as the README's test command
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert [re.sub(r"^python3 ", "python ", line) for line in ci if not line.startswith("#")] == [TEST_COMMAND]


def test_study_section_is_generated_from_summary_json():
    text = (ROOT / "docs" / "study.md").read_text()
    section = report.START + text.split(report.START, 1)[1].split(report.END, 1)[0] + report.END + "\n"
    summary = read_json(str(ROOT / "results" / "small_scale" / "summary.json"))
    assert section == report.markdown(summary, "../results/small_scale")
