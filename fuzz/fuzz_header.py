"""Coverage-guided fuzzing of the header and manifest parsers (run by hand, not in CI).

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_header.py -max_total_time=300 -rss_limit_mb=4096

Arbitrary bytes go to `parse_header` (as a whole file, and behind a valid length prefix so
the JSON rules are reached) and to `decode_manifest`; anything but our typed errors is a crash.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

from asyncweights._errors import HeaderError, ManifestError
from asyncweights._header import parse_header
from asyncweights._manifest import decode_manifest


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    if mode == 0:
        with contextlib.suppress(HeaderError):
            parse_header(rest, len(rest))
    elif mode == 1:
        # A valid prefix for a JSON text followed by a data section of up to 255 bytes.
        data_len = rest[0] if rest else 0
        text = rest[1:]
        raw = len(text).to_bytes(8, "little") + text
        with contextlib.suppress(HeaderError):
            parse_header(raw, len(raw) + data_len)
    else:
        with contextlib.suppress(ManifestError):
            decode_manifest(rest, model="fuzz")


def main() -> None:
    atheris.instrument_all()  # every loaded Python function, asyncweights' parsers included
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
