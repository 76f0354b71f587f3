"""Every Python block of the README and of docs/*.md runs as shown, each in a fresh
interpreter.

A block that needs the network starts with a comment saying so (``# Needs the network``)
and is skipped for that reason only.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NETWORK = "# Needs the network"
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def python_blocks(text: str) -> list[str]:
    """The fenced ```python blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


BLOCKS = [(page.relative_to(ROOT).as_posix(), index, block)
          for page in PAGES for index, block in enumerate(python_blocks(page.read_text()))]


def test_the_readme_has_python_blocks():
    assert len(python_blocks((ROOT / "README.md").read_text())) >= 3


@pytest.mark.parametrize("page, index, block", BLOCKS,
                         ids=[f"{page}:{index}" for page, index, _ in BLOCKS])
def test_block_runs(page, index, block, tmp_path):
    if block.lstrip().startswith(NETWORK):
        pytest.skip(f"{page} block {index} needs the network")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{page} block {index}:\n{block}\n{result.stderr[-4000:]}"


def test_relative_links_point_to_files():
    """Every relative link of these pages names a file of the repository."""
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, missing
