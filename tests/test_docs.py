"""The README and docs/: every relative link resolves inside the repository, anchors included,
and the README stays a user guide of at most about 300 lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# spelled with a character class so that this file does not match itself
HISTORY = re.compile(r"[s]ession|[i]ssue ?\d|[N]OTES-s", re.I)
ORT_API = re.compile(r"\b(InferenceSession|SessionOptions)\b")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in page.read_text().splitlines()
            if line.startswith("#")}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
    return [m for m in LINK.findall(text) if not re.match(r"[a-z]+:", m)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    assert _links(page) or page.name != "README.md", "the README links to docs/"
    for link in _links(page):
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} does not exist"
        assert ROOT in path.parents or path == ROOT, f"{page.name}: {link} leaves the repository"
        if anchor:
            assert anchor in _anchors(path), f"{page.name}: no heading for #{anchor} in {path.name}"


def test_anchor_follows_github_rules() -> None:
    assert _anchor(" Deployment on ONNX Runtime (zoo)") == "deployment-on-onnx-runtime-zoo"
    assert _anchor("Real-model suite: `imagenet-efficientnet-lite0`") == \
        "real-model-suite-imagenet-efficientnet-lite0"


def test_readme_is_a_short_user_guide() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 310, f"README has {len(lines)} lines"
    assert not [ln for ln in lines if HISTORY.search(ln)]


def test_no_development_history_in_the_product() -> None:
    """README, docs, src and tests carry no words about how the work was organised. ONNX
    Runtime's own class names are the one exception the pattern has to allow."""
    hits = []
    for path in [ROOT / "README.md", *(p for d in ("docs", "src", "tests") for p in (ROOT / d).rglob("*")
                                       if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".json"))]:
        if "egg-info" in path.parts:
            continue
        for i, ln in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(ORT_API.sub("", ln)):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {ln.strip()}")
    assert not hits, "\n".join(hits)
