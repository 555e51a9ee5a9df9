"""Every citation in the repository resolves inside it: decision references
(``docs/decisions/<file>.md#<anchor>``) and relative Markdown links name files and anchors that
exist, and nothing points at a document that only lives outside the repository."""

import os
import re
import subprocess

import pytest

from tests.helpers import REPO

TEXT_SUFFIXES = (".py", ".md", ".yml", ".yaml", ".toml", ".txt", ".cfg", ".sh", ".in")
TEXT_NAMES = ("Makefile",)

#: References to the out-of-repository method spec and paper texts this project was written
#: from (its sections, its decisions, its files). Built from pieces so that this file does not
#: match itself.
OUT_OF_REPO = re.compile(
    "|".join(
        [
            r"\bspec\s*" + "\u00a7",  # a section of the spec
            r"\bspec's\b",
            r"\bthe spec\b",
            r"\bspec\s+(?:decisions?|suggestions?|alternatives?)\b",
            "methods" + r"\.md",
            r"shared/(?:docs|papers)/",
        ]
    ),
    re.IGNORECASE,
)
DECISION_REF = re.compile(r"docs/decisions/([\w.-]+\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _files():
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = []
    for rel in out:
        name = os.path.basename(rel)
        if (name.endswith(TEXT_SUFFIXES) or name in TEXT_NAMES) and os.path.isfile(
            os.path.join(REPO, rel)
        ):
            files.append(rel)
    return sorted(files)


def _read(rel):
    with open(os.path.join(REPO, rel), encoding="utf-8", errors="replace") as f:
        return f.read()


def _slug(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text):
    """Anchors of a Markdown text: explicit ``<a id=...>`` ones and every heading's slug
    (a repeated slug gets ``-1``, ``-2``, ... as on GitHub).

    Args:
        text (str): Markdown.
    Returns:
        set[str]
    """
    found = set(EXPLICIT_ANCHOR.findall(text))
    seen = {}
    fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        m = None if fence else HEADING.match(line)
        if m:
            slug = _slug(m.group(2))
            n = seen.get(slug, 0)
            found.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return found


def _line(text, pos):
    return text.count("\n", 0, pos) + 1


def test_nothing_points_at_documents_outside_the_repository():
    bad = []
    for rel in _files():
        if rel == "tests/test_docs.py":
            continue
        text = _read(rel)
        for m in OUT_OF_REPO.finditer(text):
            bad.append(f"{rel}:{_line(text, m.start())}: {m.group(0)!r}")
    assert not bad, (
        "references to a document outside the repository; record the decision in "
        "docs/decisions/<paper>.md and cite it there:\n" + "\n".join(bad)
    )


def test_decision_citations_resolve():
    cache, bad, cited = {}, [], 0
    for rel in _files():
        text = _read(rel)
        for m in DECISION_REF.finditer(text):
            cited += 1
            target = os.path.join("docs", "decisions", m.group(1))
            path = os.path.join(REPO, target)
            if not os.path.isfile(path):
                bad.append(f"{rel}:{_line(text, m.start())}: {target} does not exist")
                continue
            if m.group(2):
                if target not in cache:
                    cache[target] = anchors(_read(target))
                if m.group(2) not in cache[target]:
                    bad.append(
                        f"{rel}:{_line(text, m.start())}: no anchor '#{m.group(2)}' in {target}"
                    )
    assert cited > 50, f"only {cited} decision citations found: is the pattern still used?"
    assert not bad, "citations of missing decisions:\n" + "\n".join(bad)


def test_relative_markdown_links_resolve():
    bad = []
    for rel in _files():
        if not rel.endswith(".md"):
            continue
        text = _read(rel)
        own = None
        for m in MD_LINK.finditer(text):
            link = m.group(1).strip("<>")
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            where = f"{rel}:{_line(text, m.start())}: {link}"
            if path:
                target = os.path.normpath(os.path.join(os.path.dirname(rel), path))
                full = os.path.join(REPO, target)
                if target.startswith("..") or not os.path.exists(full):
                    bad.append(f"{where}: no such file in the repository")
                    continue
                if anchor and target.endswith(".md") and anchor not in anchors(_read(target)):
                    bad.append(f"{where}: no such anchor in {target}")
            elif anchor:
                own = anchors(text) if own is None else own
                if anchor not in own:
                    bad.append(f"{where}: no such anchor in this file")
    assert not bad, "Markdown links that do not resolve:\n" + "\n".join(bad)


def test_anchor_rules():
    text = '# A `key` **bold** (x)\n<a id="made-up"></a>\n## Same\n## Same\n```\n# not\n```\n'
    assert anchors(text) == {"a-key-bold-x", "made-up", "same", "same-1"}
    assert OUT_OF_REPO.search("see the spec decision") and OUT_OF_REPO.search("SPEC \u00a72.3")
    assert not OUT_OF_REPO.search("spec (str): the faiss factory string it was built from")
