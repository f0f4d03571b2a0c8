"""The documentation's examples run as written.

Every ```python block of each page below runs, in order, in one fresh namespace per page, in a
temporary working directory (files the examples write land there). A failure names the page and
the block; tracebacks point at the page's own line numbers. Shell commands and output sit in
```bash / ```text fences, which are not run.
"""
from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# page -> the packages its examples import besides torch and nf4kern
PAGES = {
    "README.md": (),
    "docs/quickstart.md": ("transformers", "safetensors"),
    "docs/migrating-from-bitsandbytes.md": ("bitsandbytes", "transformers", "safetensors"),
    "docs/migrating-from-peft.md": ("peft", "bitsandbytes", "transformers", "safetensors"),
}
# fence languages a page may use: python runs, the others are shell commands or output
LANGUAGES = {"python", "bash", "sh", "text"}

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line number of the first code line, code) for each top-level ``` block."""
    return [(m.group(1).strip(), text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text)]


def python_blocks(page: str) -> list[tuple[int, str]]:
    return [(line, code) for lang, line, code in fenced_blocks((ROOT / page).read_text(encoding="utf-8")) if lang == "python"]


def test_fence_parser():
    text = "intro\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    assert fenced_blocks(text) == [("python", 3, "x = 1\n"), ("bash", 7, "ls\n"), ("python", 10, "y = 2\nz = 3\n")]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_fences_are_labelled(page):
    """Every code block says what it is, so no example silently escapes the run below."""
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = fenced_blocks(text)
    assert text.count("```") == 2 * len(blocks), f"{page}: unbalanced or indented ``` fences"
    for lang, line, _ in blocks:
        assert lang in LANGUAGES, f"{page}:{line - 1}: code fence labelled {lang!r}, not one of {sorted(LANGUAGES)}"
    assert python_blocks(page), f"{page} has no python example"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    for package in PAGES[page]:
        pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    blocks = python_blocks(page)
    for number, (line, code) in enumerate(blocks, 1):
        # Padding with newlines makes tracebacks show the page's own line numbers.
        compiled = compile("\n" * (line - 1) + code, str(ROOT / page), "exec")
        try:
            exec(compiled, namespace)
        except Exception:
            failure = traceback.format_exc()
        else:
            continue
        pytest.fail(f"{page}: python block {number} of {len(blocks)} (line {line}) failed:\n{failure}", pytrace=False)
