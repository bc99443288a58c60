"""The documents' links: every relative link in README.md, BENCHMARKS.md and docs/*.md names a file
that exists, and every `#anchor` into a markdown file names one of its headings (GitHub's slug rule:
lowercase, punctuation other than `-` and `_` dropped, spaces to `-`, `-1`, `-2`, ... for repeats).
Links from docs/ stay inside docs/ and mkdocs.yml's nav lists every page, as `mkdocs build --strict`
requires (CI does not run mkdocs; this is the same check without it). Pure stdlib: no project import.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS_DIR = ROOT / "docs"
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(DOCS_DIR.glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; reference definitions `[x]: target`.
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str):
    """(line number, line) of every line outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading. Links and code spans keep their text; then lowercase, drop
    every character that is not a letter, digit, `_`, `-` or space, and turn each space into `-`.

    >>> github_slug("Errors: `data.on_error`")
    'errors-dataon_error'
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = _CODE_SPAN.sub(lambda m: m.group(2), text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    """Every heading anchor of a markdown file; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(path: Path):
    """(line number, target) of every link in the prose of a markdown file (code is not prose)."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        line = _CODE_SPAN.sub("", line)
        for m in _INLINE_LINK.finditer(line):
            yield number, m.group(1)
        m = _REF_DEF.match(line)
        if m:
            yield number, m.group(1)


def check(path: Path, inside: Path | None = None) -> list:
    """What is wrong with the relative links of one markdown file, as `file:line: message` strings.
    `inside`: a folder every link must stay in (docs/ for the mkdocs pages)."""
    problems = []
    for number, target in links(path):
        if _SCHEME.match(target) or target.startswith("//"):
            continue  # http:, https:, mailto: ... are not checked here
        where = f"{path.name}:{number}: {target}"
        file_part, _, anchor = unquote(target).partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        if file_part.startswith("/"):
            problems.append(f"{where}: an absolute path; use a relative link")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file {dest}")
            continue
        if inside is not None and not dest.is_relative_to(inside.resolve()):
            problems.append(f"{where}: leaves {inside.name}/ (mkdocs --strict refuses it; name the file as `code`)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {dest.name} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    inside = DOCS_DIR if path.parent == DOCS_DIR else None
    assert check(path, inside) == []


def test_mkdocs_nav_lists_every_page():
    """mkdocs.yml's nav names exactly the pages in docs/ (strict mode fails on a page left out)."""
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    assert nav == {p.name for p in DOCS_DIR.glob("*.md")}


def test_the_checker_finds_bad_links(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "code.py").write_text("")
    (docs / "b.md").write_text(
        "# B page\n\n## What happens when…\n\n## Errors: `data.on_error`\n\n## Repeat\n\n## Repeat\n"
    )
    (docs / "a.md").write_text(
        "# A\n"
        "[good](b.md#what-happens-when) [good](b.md#errors-dataon_error) [good](b.md#repeat-1) [good](#a)\n"
        "[missing file](c.md) and ![missing image](img/x.png)\n"
        "[missing anchor](b.md#no-such-heading) [same file](#nowhere)\n"
        "[out of docs](../code.py) [web](https://example.com/x.md) `[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[ref]: d.md\n"
    )
    problems = check(docs / "a.md", inside=docs)
    assert [p.split(": ")[0] + ": " + p.split(": ")[1] for p in problems] == [
        "a.md:3: c.md",
        "a.md:3: img/x.png",
        "a.md:4: b.md#no-such-heading",
        "a.md:4: #nowhere",
        "a.md:5: ../code.py",
        "a.md:9: d.md",
    ]
    assert "no heading with the anchor #no-such-heading" in problems[2]
    assert "leaves docs/" in problems[4]
    # Outside docs/ the same link to a file that exists is fine.
    assert not any("code.py" in p for p in check(docs / "a.md"))


def test_github_slug_rule():
    assert github_slug("Forgetting: replay, EWC and chained recipes") == "forgetting-replay-ewc-and-chained-recipes"
    assert github_slug("Rehearsal: a chat model's own answers") == "rehearsal-a-chat-models-own-answers"
    assert github_slug("Preference alignment (DPO, IPO, SimPO)") == "preference-alignment-dpo-ipo-simpo"
    assert github_slug("Two commands (fresh clone, no GPU needed)") == "two-commands-fresh-clone-no-gpu-needed"
    assert github_slug("See [the data](data.md) page") == "see-the-data-page"
