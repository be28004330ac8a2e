"""The exception tree and how task-group errors are unwrapped (`_errors.single_error`)."""

from __future__ import annotations

import anyio
import pytest

import asyncweights as aw
from asyncweights._errors import single_error


def test_a_group_of_one_kind_gives_its_first_error() -> None:
    first = aw.BlobMissingError("blob file missing", digest="sha256:" + "a" * 64)
    second = aw.HeaderError("bad header")
    group = ExceptionGroup("", [ExceptionGroup("", [first]), second])
    assert single_error(group, aw.AsyncWeightsError) is first


def test_a_group_with_anything_else_is_kept() -> None:
    group = ExceptionGroup("", [aw.HeaderError("bad header"), ValueError("bug")])
    assert single_error(group, aw.AsyncWeightsError) is None
    interrupted = BaseExceptionGroup("", [aw.HeaderError("bad"), KeyboardInterrupt()])
    assert single_error(interrupted, aw.AsyncWeightsError) is None


def test_several_kinds_are_accepted_together() -> None:
    error = OSError(28, "No space left on device")
    group = ExceptionGroup("", [error, aw.SourceError("no model")])
    assert single_error(group, (aw.AsyncWeightsError, OSError)) is error
    assert single_error(group, aw.AsyncWeightsError) is None


async def test_a_typed_error_from_a_task_group_comes_out_bare() -> None:
    # Unwrapped in a plain `except`, never by raising inside `except*`: on CPython 3.11.0 to
    # 3.11.3 that would wrap the raised error in a new ExceptionGroup (CPython issue 103590).
    async def fail() -> None:
        raise aw.ComponentNotFoundError("vision", ["text"], model="m")

    async def run() -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fail)
        except BaseExceptionGroup as group:
            error = single_error(group, aw.AsyncWeightsError)
            assert error is not None
            raise error from error.__cause__

    with pytest.raises(aw.ComponentNotFoundError) as info:
        await run()
    assert isinstance(info.value.__context__, BaseExceptionGroup)
