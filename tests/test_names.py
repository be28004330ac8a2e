"""`_names` directly: the pure grammar of names, digests and blob file names (test_store.py
covers `ModelName.parse` on the store's side)."""

from __future__ import annotations

import re

import pytest

import asyncweights as aw
from asyncweights._names import DIGEST_PATTERN, blob_file_name, name_from_parts


def test_names_print_in_their_shortest_form() -> None:
    assert str(aw.ModelName.parse("registry.ollama.ai/library/m:latest")) == "m:latest"
    assert str(aw.ModelName.parse("ns/m")) == "ns/m:latest"
    assert str(aw.ModelName.parse("example.com/ns/m:t")) == "example.com/ns/m:t"


def test_names_read_back_from_path_parts_are_validated() -> None:
    name = name_from_parts("example.com", "ns", "m", "t", original="/srv/models/manifests/x")
    assert name == aw.ModelName("example.com", "ns", "m", "t")
    with pytest.raises(aw.InvalidNameError, match=r"bad character in tag '\.t'") as info:
        name_from_parts("registry.ollama.ai", "library", "m", ".t", original="/srv/models/x/.t")
    assert info.value.model == "/srv/models/x/.t"


def test_digest_pattern_and_blob_file_names() -> None:
    digest = "sha256:" + "AB" * 32
    assert re.fullmatch(DIGEST_PATTERN, digest)
    assert blob_file_name(digest) == "sha256-" + "ab" * 32
    for bad in ("sha256:" + "a" * 63, "sha256-" + "a" * 64, "sha256:" + "a" * 64 + "\n"):
        assert not re.fullmatch(DIGEST_PATTERN, bad)
        with pytest.raises(aw.InvalidDigestError, match="expected 'sha256:' and 64 hex digits"):
            blob_file_name(bad)
