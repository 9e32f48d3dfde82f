"""The docs a seller reads hold no dead ends: links resolve, commands exist, the README stays short.

A newcomer follows the docs alone; a link to a moved section, a `make` target that was renamed or
a `marketplace-sidecar` command that never existed stops them where no test of the code would.
"""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 350

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """Lines outside fenced blocks (inline code removed), and the code: fenced lines and spans."""
    prose: list[str] = []
    code: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
            continue
        code.extend(m.group(2) for m in CODE_SPAN.finditer(line))
        prose.append(CODE_SPAN.sub("", line))
    return prose, code


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower-cased, punctuation dropped, spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in " -_" or category[0] in "LN" or category == "Mn":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m is None:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def link_problems(path: Path) -> list[str]:
    """Relative links of one file whose target file or heading does not exist."""
    problems = []
    prose, _ = _prose_and_code(path.read_text(encoding="utf-8"))
    for line in prose:
        for m in LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            file_part, _, fragment = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not resolved.exists():
                problems.append(f"{where}: no such file")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                problems.append(f"{where}: no heading #{fragment} in {resolved.name}")
    return problems


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


def cli_commands() -> set[str]:
    """The commands `marketplace-sidecar --help` lists, as a user reads them."""
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    block = out.split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    return set(re.findall(r"^ {4}([a-z][a-z-]*)(?:\s|$)", block, re.M))


def named_in_code(pattern: str) -> dict[str, set[str]]:
    """Words following `pattern` in the code (spans and fenced blocks) of every doc, per file."""
    found: dict[str, set[str]] = {}
    for path in DOCS:
        _, code = _prose_and_code(path.read_text(encoding="utf-8"))
        for line in code:
            for m in re.finditer(pattern, line):
                found.setdefault(m.group(1), set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_readme_is_a_front_door_of_at_most_350_lines() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(path: Path) -> None:
    assert link_problems(path) == []


def test_every_make_target_the_docs_name_exists() -> None:
    named = named_in_code(r"(?:^|[\s;&|(`$])make ([a-z][\w.-]*)")
    assert named, "the docs name no make target: the pattern no longer matches them"
    missing = {t: files for t, files in named.items() if t not in make_targets()}
    assert missing == {}


def test_every_cli_command_the_docs_name_exists() -> None:
    commands = cli_commands()
    assert {"run", "probe", "doctor", "demo"} <= commands, commands
    named = named_in_code(r"marketplace-sidecar ([a-z][\w-]*)")
    assert named, "the docs name no command: the pattern no longer matches them"
    missing = {c: files for c, files in named.items() if c not in commands}
    assert missing == {}


def test_the_checker_sees_a_broken_link_and_a_missing_heading(tmp_path: Path) -> None:
    """The link check itself: a wrong file and a wrong anchor are caught, a right one is not."""
    page = ROOT / "docs" / "__probe_of_the_link_check.md"
    page.write_text(
        "# Top `Title`: here\n\n## Top Title here\n\n"
        "[a](ops.md) [b](#top-title-here-1) [c](#top-title-here-2) [d](../README.md)\n"
        "`[e](not-a-link.md)`\n",
        encoding="utf-8",
    )
    try:
        problems = link_problems(page)
    finally:
        page.unlink()
    assert [p.split(": ", 1)[1] for p in problems] == [
        "(ops.md): no such file",
        "(#top-title-here-2): no heading #top-title-here-2 in __probe_of_the_link_check.md",
    ]
