"""README.md's Python blocks run as written.

Every ```python block of README.md is executed, in order and in one namespace (as the cells
of a notebook), in a subprocess whose current folder is a fresh one holding only a link to
the repository's configs/ (so `runs/...` lands there), with the 8 CPU devices of
conftest.py. A `print(...)` line whose trailing comment is not prose (`# (8, 128, 384)`)
must print that text. A block right after the line `<!-- readme-test: slow -->` (an HTML
comment, not rendered) trains a model; those blocks run in the `slow` test only, so the
default suite stays fast; the fast blocks must not depend on them.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

SLOW_MARK = "<!-- readme-test: slow -->"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DRIVER = """
import json, sys
namespace = {"__name__": "__main__"}
for i, block in enumerate(json.load(open(sys.argv[1]))):
    print(f"--- block {i}", flush=True)
    exec(compile(block, f"README.md python block {i}", "exec"), namespace)
"""


def python_blocks(text: str) -> list[tuple[str, bool]]:
    """(code, slow) of every ```python block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip().splitlines()
        blocks.append((match.group(1), bool(before) and before[-1].strip() == SLOW_MARK))
    return blocks


def expected_prints(code: str) -> list[str]:
    """Texts a block's `print(...)  # text` lines promise (comments made of output)."""
    found = []
    for line in code.splitlines():
        match = re.match(r"\s*print\(.*\)\s+#\s*(.+)$", line)
        if match and re.fullmatch(r"[\d\s(),.\[\]'\-]+", match.group(1)):
            found.append(match.group(1).strip())
    return found


def run_blocks(blocks: list[str], tmp_path) -> str:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = {**subprocess_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, "blocks.json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for code in blocks:
        for text in expected_prints(code):
            assert text in proc.stdout, (text, proc.stdout[-2000:])
    return proc.stdout


def test_the_block_parser_finds_marks_and_promised_output():
    text = ("x\n```python\nprint(1)  # 1\n```\n" + SLOW_MARK +
            "\n```python\nprint(2)  # the answer\n```\n```bash\nls\n```\n")
    assert python_blocks(text) == [("print(1)  # 1\n", False),
                                   ("print(2)  # the answer\n", True)]
    assert expected_prints("print(a.shape)     # (8, 128, 384) (3, 16)") == \
        ["(8, 128, 384) (3, 16)"]


def test_readme_fast_python_blocks_run(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    fast = [code for code, slow in blocks if not slow]
    assert fast and len(blocks) > len(fast), "README.md has fast and slow Python blocks"
    run_blocks(fast, tmp_path)


@pytest.mark.slow  # trains the tiny model (about 100 s of CPU)
def test_readme_all_python_blocks_run(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    run_blocks([code for code, _ in blocks], tmp_path)
