"""The README's Python blocks run as written against a demo store, so they cannot rot.

The demo store is generated once per module with ``asyncweights demo`` at a small size (the
README's ``python3 dev.py demo`` makes the same models at 512 MiB); the only change made to a
block is the size tag of the demo model's name (``512mib`` becomes ``2mib``). Each block runs
alone in a fresh interpreter, with ``XDG_CACHE_HOME`` pointing at the demo store's cache, the
way a reader would run it after pasting it into a file.

A block that cannot run here must say so on the line before its fence:
``<!-- readme-test: skip, REASON -->``; the reason is printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SIZE, TAG = "2MiB", "2mib"
_FENCE = re.compile(r"^```python\n(.*?)^```\n", re.DOTALL | re.MULTILINE)
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip,\s*(.+?)\s*-->\s*$")

# What a block prints when it works, keyed by a line that identifies the block.
EXPECTED = {
    'name = "layers.0.attention.to_q.weight"': [
        "100%\n",
        "model quantization: Quantization(type='int4', mode='affine', bits=4, group_size=64)",
        "layers.0.attention.to_q.weight Quantization(type='int4', mode='affine', bits=4,"
        " group_size=64) (128, 16) -> (128, 128) mlx.core.bfloat16",
        "streamed 27 vae tensors as float16",
    ],
    'for layer in ("self_attn.q_proj", "self_attn.o_proj"):': [
        "self_attn.q_proj split on axis 0 holds",
        "self_attn.o_proj split on axis 1 holds",
        "embed_tokens held whole: True",
    ],
    "async def handle_request(": [
        "0 {'status': 'success', 'digest': 'asyncweights-demo:2mib'",
        "2 26 tensors",
        "CacheStats(loads=1, hits=3, joins=2, failures=0",
    ],
}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        blocks.append(Block(line, match.group(1), skip.group(1) if skip else None))
    return blocks


def environ(cache: Path) -> dict[str, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop("OLLAMA_MODELS", None)
    return env


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("readme") / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "asyncweights", "demo", "--size", SIZE, "--no-progress"],
        capture_output=True,
        text=True,
        env=environ(cache),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (cache / "asyncweights" / "demo" / "manifests").is_dir()
    return cache


def test_readme_has_python_blocks_and_sections_in_order() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 2
    assert all(b.skip is None for b in blocks if any(k in b.code for k in EXPECTED))
    # A newcomer's order; other sections may come between these.
    headings = re.findall(r"^## (.+)$", README.read_text(encoding="utf-8"), re.MULTILINE)
    wanted = [
        "Install",
        "The two commands",
        "A first program",
        "Features",
        "Command line",
        "Use it in a server",
        "Performance",
        "Design notes",
    ]
    assert [h for h in headings if h in wanted] == wanted


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: f"line{b.line}")
def test_readme_python_block_runs(block: Block, demo_cache: Path, tmp_path: Path) -> None:
    if block.skip is not None:
        pytest.skip(f"README line {block.line}: {block.skip}")
    code = block.code.replace("asyncweights-demo:512mib", f"asyncweights-demo:{TAG}")
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=environ(demo_cache),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, f"README line {block.line}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    expected = [out for key, outs in EXPECTED.items() if key in block.code for out in outs]
    for fragment in expected:
        assert fragment in result.stdout, (fragment, result.stdout)


def test_every_expected_output_belongs_to_a_block() -> None:
    # A block renamed in the README must not leave its expectations silently unchecked.
    codes = [b.code for b in readme_blocks()]
    assert all(any(key in code for code in codes) for key in EXPECTED)
