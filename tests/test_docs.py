"""The documentation: a README a newcomer can hold, pages that build without a broken link, commands that exist.

The commands' flags are checked against their parsers where those commands are specified (tests/test_at_scale.py
for run and index, tests/test_search_update.py for search); here every documented command must at least name a
command and subcommand that exist.
"""

import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys

import markdown
import pytest

from helpers import REPO, documented_commands

README = os.path.join(REPO, "README.md")


def test_the_docs_site_builds_strictly(tmp_path):
    """mkdocs --strict fails on a link to a missing page or anchor (mkdocs.yml: validation)."""
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=REPO, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "search" / "index.html").exists()


def test_the_readme_is_a_front_page():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) < 300
    headings = [line for line in lines if line.startswith("## ")]
    for heading in ("## Quick start", "## Use it in your own pipeline", "## What people do with it", "## Read more"):
        assert heading in headings


def _anchors(path: str) -> set:
    """The heading ids the docs site gives a page: Python-Markdown's toc, as MkDocs runs it."""
    md = markdown.Markdown(extensions=["tables", "toc"])
    with open(path, encoding="utf-8") as f:
        md.convert(f.read())

    def ids(tokens):
        for token in tokens:
            yield token["id"]
            yield from ids(token["children"])

    return set(ids(md.toc_tokens))


def test_every_link_in_the_readme_reaches_a_page_and_heading():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if "://" in link:
            continue
        target, _, anchor = link.partition("#")
        path = os.path.join(REPO, target) if target else README
        assert os.path.exists(path), link
        if anchor:
            assert anchor in _anchors(path), link


def _help_exit(command: str) -> int:
    words = shlex.split(re.sub(r"\s\[[^\]]*\]", "", command))
    module = words[2]
    if importlib.util.find_spec(module).submodule_search_locations:  # a package: `python -m` runs its __main__
        module += ".__main__"
    subcommand = [words[3]] if len(words) > 3 and not words[3].startswith("-") else []
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return importlib.import_module(module).main([*subcommand, "--help"])
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("command", sorted(set(documented_commands({"$(cat /tmp/flink/beam-options)": "",
                                                                      "${NIGHT:-$(date +%F)}": "night"}))))
def test_every_documented_command_exists(command):
    assert _help_exit(command) == 0, command
