"""Every tuning knob of a load, in one frozen object."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds on a load's memory, files, threads and progress rate.

    Attributes:
        group_bytes: tensor bytes read and evaluated per worker call; also bounds the time
            a cancel waits for the call in flight: 32 MiB takes 10-30 ms on a 2-core VM.
        max_open_files: blob files open at once across all workers (MLX keeps a lazily
            loaded blob open until it is evaluated). Lowered automatically when the
            process's RLIMIT_NOFILE leaves less room.
        workers: groups loaded concurrently, each in its own worker thread. On a 2-core VM,
            3 gave the same harness throughput as 2 with worse loop lag (p99 7.8 vs 4.4 ms).
        buffered_groups: evaluated groups waiting for a slow consumer of `stream_weights`;
            memory in flight is at most ``(workers + buffered_groups) * group_bytes``.
        header_workers: worker calls reading headers at once while planning. Header reads
            are short and hold the GIL for most of their time: more than two contend
            (measured); on a cold disk two already overlap the reads.
        header_batch: blob headers read per worker call while planning.
        direct_read_bytes: blobs up to this size are read whole with one ``pread`` and
            copied into MLX arrays (fast for small tensors); larger ones go through
            ``mx.load``, which reads straight into fresh MLX buffers.
        prefetch_bytes: small blobs read whole while planning are kept for the load (so they
            are opened once), up to this many bytes in all; the rest are read again later.
        reader_nice: groups are read in asyncweights' own threads at this nice value (MLX's
            reader threads they start inherit it), so the event-loop thread runs first when
            it wakes; None keeps normal priority.
        max_bytes: refuse a load whose tensors exceed this many bytes, before reading any.
        progress_interval: seconds between progress events (first and last always sent).
        pull_streams: blob downloads in flight at once while pulling (Ollama's default
            ``OLLAMA_MAX_TRANSFER_STREAMS`` is 4).
        registry_timeout: seconds a registry request may wait to connect, or between two
            reads of a response, before it is retried.
        registry_retries: attempts after the first for a failed registry request or a blob
            download that broke off (resumed where it stopped), with exponential backoff.

    Caps on untrusted metadata, each far above any real model and checked before the
    bytes are decoded (the error names the cap):

    Attributes:
        max_manifest_bytes: a manifest file's size (real ones: a few KiB; 1,000 layers take
            about 200 KiB).
        max_layers: layers in one manifest (config included).
        max_config_bytes: a JSON config layer or the config blob (real ones: a few KiB).
        max_header_bytes: a safetensors header's length (MLX's own bound is 100,000,000;
            real headers of one Ollama blob: under 1 MiB).
        max_tensors: tensor entries in one safetensors header.
        max_name_bytes: a tensor or layer name, in UTF-8 bytes.
    """

    group_bytes: int = 32 * MiB
    max_open_files: int = 32
    workers: int = 2
    buffered_groups: int = 1
    header_workers: int = 2
    header_batch: int = 64
    direct_read_bytes: int = 64 * 1024
    prefetch_bytes: int = 256 * MiB
    reader_nice: int | None = 10
    max_bytes: int | None = None
    progress_interval: float = 0.1
    max_manifest_bytes: int = 64 * MiB
    max_layers: int = 262_144
    max_config_bytes: int = 64 * MiB
    max_header_bytes: int = 64 * MiB
    max_tensors: int = 262_144
    max_name_bytes: int = 4096
    pull_streams: int = 4
    registry_timeout: float = 30.0
    registry_retries: int = 5

    def __post_init__(self) -> None:
        for name in (
            "group_bytes",
            "max_open_files",
            "workers",
            "header_workers",
            "header_batch",
            "max_manifest_bytes",
            "max_layers",
            "max_config_bytes",
            "max_header_bytes",
            "max_tensors",
            "max_name_bytes",
            "pull_streams",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")
        if self.buffered_groups < 0:
            raise ValueError("Limits.buffered_groups must not be negative")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError("Limits.max_bytes must not be negative")
        if self.registry_timeout <= 0:
            raise ValueError("Limits.registry_timeout must be positive")
        if self.registry_retries < 0:
            raise ValueError("Limits.registry_retries must not be negative")
        if self.progress_interval < 0:
            raise ValueError("Limits.progress_interval must not be negative")
