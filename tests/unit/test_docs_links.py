"""The documentation holds together: every relative link in the README and in docs/ leads to a
file that exists and, for a ``#fragment`` into a Markdown page, to a heading of that page (by
GitHub's anchor rules); the README maps every page of docs/ and links what a newcomer needs.

A page moved or a heading renamed breaks links silently on GitHub; here it fails a test that
names the page, the line and the link.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def documentation_pages(root: Path = ROOT) -> list[Path]:
    pages = [root / "README.md", *root.glob("docs/**/*.md"), *root.glob("charts/*/README.md")]
    return sorted(page for page in pages if page.is_file())


_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "optional title") and ![alt](target); link text may hold one level of brackets.
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker[0] * len(marker)
                continue
            if marker.startswith(fence):
                fence = None
                continue
        if fence is None:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text, lower-cased, with
    punctuation and symbols other than ``-`` and ``_`` removed and each space turned into ``-``."""
    # Code spans render verbatim: set them aside so no markup rule below touches them.
    spans: list[str] = []

    def set_aside(match: re.Match[str]) -> str:
        spans.append(match.group(2).strip())
        return f"\x00{len(spans) - 1}\x00"

    text = _CODE_SPAN.sub(set_aside, heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML renders as nothing
    text = re.sub(r"(\*{1,3})(\S(?:.*?\S)?)\1", r"\2", text)
    text = re.sub(r"(?<!\w)(_{1,3})(\S(?:.*?\S)?)\1(?!\w)", r"\2", text)  # not intraword
    text = re.sub(r"\x00(\d+)\x00", lambda match: spans[int(match.group(1))], text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page; a repeated slug gets ``-1``, ``-2``... as on GitHub."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in _prose_lines(text):
        match = _ATX_HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


@dataclass(frozen=True)
class Link:
    line: int
    target: str


def relative_links(text: str) -> list[Link]:
    """Links to places inside the repository (no scheme, not protocol-relative)."""
    links: list[Link] = []
    for number, line in _prose_lines(text):
        prose = _CODE_SPAN.sub("", line)
        targets = [match.group(1) for match in _INLINE_LINK.finditer(prose)]
        definition = _REFERENCE_DEFINITION.match(prose)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            target = target.removeprefix("<").removesuffix(">")
            if not _SCHEME.match(target):
                links.append(Link(number, target))
    return links


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One message per link of ``page`` that leads nowhere."""
    problems: list[str] = []
    text = page.read_text(encoding="utf-8")
    for link in relative_links(text):
        path_part, _, fragment = link.target.partition("#")
        where = f"{page.relative_to(root)}:{link.line}: ({link.target})"
        if path_part:
            target = (page.parent / unquote(path_part)).resolve()
            if not target.is_relative_to(root.resolve()):
                problems.append(f"{where} leaves the repository")
                continue
            if not target.exists():
                problems.append(f"{where} names a file that does not exist")
                continue
        else:
            target = page
        if (
            fragment
            and target.suffix == ".md"
            and unquote(fragment) not in anchors(target.read_text("utf-8"))
        ):
            problems.append(f"{where} names no heading of {target.relative_to(root.resolve())}")
    return problems


@pytest.mark.parametrize(
    "page", documentation_pages(), ids=lambda page: str(page.relative_to(ROOT))
)
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Proxy trust (`FORWARDED_ALLOW_IPS`)", "proxy-trust-forwarded_allow_ips"),
        (
            "4. API keys in Zuplo: the consumer becomes the owner",
            "4-api-keys-in-zuplo-the-consumer-becomes-the-owner",
        ),
        ("What is tested, and what is not", "what-is-tested-and-what-is-not"),
        ("Helm (`charts/fastapi-app`)", "helm-chartsfastapi-app"),
        ("End-to-end on a cluster (`tests/e2e/run.sh`)", "end-to-end-on-a-cluster-testse2erunsh"),
        ("Why years 1900\u20139998", "why-years-19009998"),  # an en dash goes
        ("Runbook: FastAPIAppBackupTooOld", "runbook-fastapiappbackuptooold"),
        ("401 and 403", "401-and-403"),
        ("The **bold** and [linked](x.md) part", "the-bold-and-linked-part"),
        ("Rock & roll", "rock--roll"),
        ("A _light_ touch on snake_case", "a-light-touch-on-snake_case"),
    ],
)
def test_github_slug_rules(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_repeated_headings_are_numbered_and_code_blocks_are_not_headings() -> None:
    text = "# Title\n## Runbook\n```bash\n# not a heading\n```\n## Runbook\n## Runbook\n"
    assert anchors(text) == {"title", "runbook", "runbook-1", "runbook-2"}


def test_the_checker_reports_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n## Present\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Page\n"
        "[ok](docs/other.md#present) [ok](#page) [web](https://example.com/x#y)\n"
        "[missing file](docs/gone.md)\n"
        "[missing heading](docs/other.md#absent)\n"
        "[missing here](#absent)\n"
        "[escape](../outside.md)\n"
        "`[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(page, root=tmp_path)
    assert [problem.split(":")[1] for problem in problems] == ["3", "4", "5", "6"], problems
    assert "does not exist" in problems[0]
    assert "no heading" in problems[1]
    assert "no heading" in problems[2]
    assert "leaves the repository" in problems[3]


def _readme_link_targets() -> set[str]:
    return {link.target for link in relative_links(README.read_text(encoding="utf-8"))}


def test_the_readme_maps_every_page_of_the_docs() -> None:
    linked = {target.partition("#")[0] for target in _readme_link_targets()}
    pages = {f"docs/{page.relative_to(ROOT / 'docs')}" for page in (ROOT / "docs").glob("**/*.md")}
    assert pages - linked == set(), "add these pages to the README's map of the docs"


def test_the_readme_links_what_a_newcomer_needs_first() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make run" in text
    assert "make test" in text
    assert "Python 3.11" in text
    assert "configuration" in anchors(text)
    needed = {
        "docs/api.md",  # the API beyond the overview
        "docs/deployment.md",  # deployment guide
        "docs/operations.md#migrations",
        "docs/operations.md#rollback",
        "docs/backup-restore.md",
        "docs/testing.md",
    }
    assert needed - _readme_link_targets() == set()


@pytest.mark.parametrize(
    "page", documentation_pages(), ids=lambda page: str(page.relative_to(ROOT))
)
def test_every_page_opens_with_one_title_and_a_paragraph_saying_what_it_is(page: Path) -> None:
    lines = [line for _, line in _prose_lines(page.read_text(encoding="utf-8"))]
    titles = [line for line in lines if re.match(r"^# \S", line)]
    assert lines[0] == titles[0], "the first line is the page's title"
    assert len(titles) == 1, titles
    opening = next(line for line in lines[1:] if line.strip())
    assert not re.match(r"^\s*(#|\||[-*+] |\d+\. |>|<)", opening), (
        f"after the title comes a paragraph saying what the page is, not: {opening!r}"
    )
