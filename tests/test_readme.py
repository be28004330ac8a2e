"""The README's Python blocks run as written against a demo store, so they cannot rot.

The demo store is generated once per module with ``asyncweights demo`` at a small size (the
README's ``python3 dev.py demo`` makes the same models at 512 MiB); the only change made to a
block is the size tag of the demo model's name (``512mib`` becomes ``2mib``). Each block runs
alone in a fresh interpreter, with ``XDG_CACHE_HOME`` pointing at the demo store's cache, the
way a reader would run it after pasting it into a file.

Blocks about other models get them in the default store (``$OLLAMA_MODELS``) the way a reader
would have them (`NEEDS`): the GGUF block finds ``llama3.2`` and ``llava`` GGUF models
(written with llama.cpp's ``gguf`` package, as tests/test_gguf.py writes them); the pull block
pulls ``z-image`` from Debian's docker-registry on a free 127.0.0.1 port (the one change made
to it: that port's URL replaces ``http://127.0.0.1:5000``), into an empty store.

A ``<!-- readme-test: skip, REASON -->`` line before a fence is still recognized (the block is
skipped with its reason printed), but `test_every_block_runs_here` fails on it: give the block
what it needs here instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from asyncweights.testing import StoreBuilder, random_weights

from .registry_support import RealRegistry, registry_missing
from .test_gguf import random_blocks, write_gguf

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
    'aw.load_weights("llama3.2")': [
        "Quantization(type='Q4_K', mode='affine', bits=4, group_size=32)\n",
        "\nllama\n",
        "['mm.0.weight'] clip\n",
    ],
    'registry = "http://127.0.0.1:5000"': [
        "conv.0.weight (16, 16)\n",
        "conv.2.weight (16, 16)\n",
    ],
    "async def handle_request(": [
        "0 {'status': 'success', 'digest': 'asyncweights-demo:2mib'",
        "2 26 tensors",
        "CacheStats(loads=1, hits=3, joins=2, failures=0",
    ],
}


@dataclass(frozen=True)
class Setup:
    """What a block needs beyond the demo store: environment, text replaced, output expected."""

    env: dict[str, str] = field(default_factory=dict)
    replace: dict[str, str] = field(default_factory=dict)
    expected: list[str] = field(default_factory=list)


# Blocks that need other models, keyed by a line that identifies the block: their fixture.
NEEDS = {
    'aw.load_weights("llama3.2")': "gguf_models",
    'registry = "http://127.0.0.1:5000"': "registry_model",
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


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """A default store with GGUF models ``llama3.2`` (Q4_K + F32) and ``llava`` (+ a projector)."""
    work = tmp_path_factory.mktemp("readme-gguf")
    main = write_gguf(
        work / "main.gguf",
        {"blk.0.attn_q.weight": ("Q4_K", random_blocks("Q4_K", 2, 256)),
         "output_norm.weight": ("F32", np.arange(4, dtype=np.float32))},
    )  # fmt: skip
    projector = write_gguf(
        work / "projector.gguf", {"mm.0.weight": ("F16", np.ones((3, 4), np.float16))}, arch="clip"
    )
    builder = StoreBuilder(work / "models")
    builder.add_gguf_model("llama3.2", weights=main)
    builder.add_gguf_model("llava", weights=main, projector=projector)
    return Setup(env={"OLLAMA_MODELS": str(builder.root)})


@pytest.fixture(scope="module")
def registry_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """docker-registry on 127.0.0.1 serving ``library/z-image:latest``; an empty default store."""
    reason = registry_missing()
    if reason is not None:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("readme-pull")
    shapes: dict[str, tuple[int, ...]] = {
        f"transformer/blocks.{i}.weight": (32, 64) for i in range(4)
    }
    shapes.update({f"vae/conv.{i}.weight": (16, 16) for i in range(3)})
    built = StoreBuilder(work / "source").add_model(
        "z-image",
        random_weights(shapes, seed="readme"),
        configs={"model_index.json": {"_class_name": "ZImagePipeline"}},
    )
    digest = "sha256:" + hashlib.sha256(built.path.read_bytes()).hexdigest()
    with RealRegistry.start(work / "registry") as registry:
        registry.push(work / "source", built.path, "library/z-image", "latest")
        yield Setup(
            env={"OLLAMA_MODELS": str(work / "models")},
            replace={"http://127.0.0.1:5000": registry.url},
            expected=[f"\n{digest}\n"],
        )


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
def test_readme_python_block_runs(
    block: Block, demo_cache: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if block.skip is not None:
        pytest.skip(f"README line {block.line}: {block.skip}")
    needs = [fixture for key, fixture in NEEDS.items() if key in block.code]
    setup = request.getfixturevalue(needs[0]) if needs else Setup()
    code = block.code.replace("asyncweights-demo:512mib", f"asyncweights-demo:{TAG}")
    for old, new in setup.replace.items():
        assert old in code, old
        code = code.replace(old, new)
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**environ(demo_cache), **setup.env},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, f"README line {block.line}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    expected = [out for key, outs in EXPECTED.items() if key in block.code for out in outs]
    for fragment in setup.expected:
        expected.append(fragment)
    for fragment in expected:
        assert fragment in result.stdout, (fragment, result.stdout)


def test_every_expected_output_belongs_to_a_block() -> None:
    # A block renamed in the README must not leave its expectations silently unchecked.
    codes = [b.code for b in readme_blocks()]
    assert all(any(key in code for code in codes) for key in EXPECTED)
    assert all(any(key in code for code in codes) for key in NEEDS)


def test_every_block_runs_here() -> None:
    # A skipped block is an unchecked one: every block now runs (its models are built here).
    assert [(b.line, b.skip) for b in readme_blocks() if b.skip is not None] == []
