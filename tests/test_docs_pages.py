"""README.md and docs/: generated reference blocks match the code, links resolve, README stays short.

The reference blocks of docs/configuration.md, docs/methods.md and docs/cli.md are written by
docs/generate.py (imported here by path); a change to a pydantic field, a registered method or a
CLI option makes this test fail until the script is run again.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
LINKED_PAGES = [REPO / "README.md", REPO / "clusters" / "README.md", *sorted(DOCS.glob("*.md"))]
#: a Markdown link's target: [text](target), not an image's alt or a URL with a scheme
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)")


def _load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (a ``#`` there is a comment, a ``[x](y)`` is code)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of ``path``'s headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors: set[str] = set()
    for line in _prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
        anchor, count = slug, 1
        while anchor in anchors:  # GitHub numbers repeated headings: name, name-1, name-2
            anchor, count = f"{slug}-{count}", count + 1
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("page", sorted(generate.PAGES))
def test_generated_blocks_match_the_code(page: str) -> None:
    text = (REPO / page).read_text()
    expected = generate.render(text, generate.PAGES[page], page)
    assert text == expected, f"{page} is stale: run python docs/generate.py (and commit the page)"


def test_check_names_the_stale_page(tmp_path: Path) -> None:
    # a copy of the pages with one generated row edited by hand: --check must name that page only
    (tmp_path / "docs").mkdir()
    for page in generate.PAGES:
        shutil.copy(REPO / page, tmp_path / page)
    methods = tmp_path / "docs" / "methods.md"
    methods.write_text(methods.read_text().replace("| `rank` |", "| `rank_by_hand` |", 1))
    # the script documents this checkout's code, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(DOCS / "generate.py"), "--check", "--root", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, env=env, check=False)
    assert result.returncode == 1
    assert "docs/methods.md is stale: run python docs/generate.py" in result.stderr
    assert "configuration.md" not in result.stderr and "cli.md" not in result.stderr
    # and writing fixes it, leaving the prose around the block alone
    subprocess.run([sys.executable, str(DOCS / "generate.py"), "--root", str(tmp_path)], check=True,
                   capture_output=True, cwd=REPO, env=env)
    assert methods.read_text() == (REPO / "docs" / "methods.md").read_text()


def test_generated_pages_cover_every_key_method_and_command() -> None:
    from medpeft_ray.methods import list_methods

    configuration = (DOCS / "configuration.md").read_text()
    for key, *_ in generate.field_rows(generate.SearchConfig):
        if "." in key or key in ("experiment", "task", "space"):
            assert f"`{key}`" in configuration or f"### {key}" in configuration, key
    methods = (DOCS / "methods.md").read_text()
    for name in list_methods():
        assert f"### {name}\n" in methods, name
    cli = (DOCS / "cli.md").read_text()
    for command in ("validate", "search", "leaderboard", "best", "report", "dashboard", "train", "methods",
                    "data check"):
        assert f"### `medpeft-ray {command}`" in cli, command


def test_generated_output_holds_no_local_path() -> None:
    for page, blocks in generate.PAGES.items():
        for name, write in blocks.items():
            body = write()
            assert str(REPO) not in body and "/home/" not in body and "/tmp/" not in body, (page, name)


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_docs_page_is_listed_in_the_index() -> None:
    index = (DOCS / "index.md").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and f"]({p.name})" not in index]
    assert not missing, f"docs/index.md does not link {', '.join(missing)}"


def test_readme_is_short_and_fits_a_terminal() -> None:
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to a page in docs/"
    assert [n for n, line in enumerate(lines, 1) if len(line) > 100] == [], "README.md lines over 100 columns"
    in_code = False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_code = not in_code
        elif in_code:
            assert len(line) <= 80, f"README.md:{number}: a code line over 80 columns"


def test_readme_keeps_the_ci_test_command() -> None:
    # .ci/run runs the fenced block after this marker verbatim
    text = (REPO / "README.md").read_text()
    marker = "<!-- test-command -->\n```bash\n"
    assert marker in text
    command = text.split(marker, 1)[1].split("\n```", 1)[0]
    assert command == 'pip install -e ".[test]" && HF_HUB_OFFLINE=1 python -m pytest -q'
