"""The knobs a user reasons about, in one frozen object.

Tuning constants no user needs to set (how planning batches its header reads, for one)
live in the modules that use them, beside the measurement that chose them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["Limits", "Priority"]

#: What a load favours when it competes for the CPU with the rest of the process.
Priority = Literal["responsive", "throughput"]

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
        direct_read_bytes: blobs up to this size are read whole with one ``pread`` and
            copied into MLX arrays (fast for small tensors); larger ones go through
            ``mx.load``, which reads straight into fresh MLX buffers.
        prefetch_bytes: small blobs read whole while planning are kept for the load (so they
            are opened once), up to this many bytes in all when a load is planned whole
            first (`WeightCache`, a `Shard`); the rest are read again later. A streamed
            `load_weights`/`stream_weights` holds only its groups in flight, so there it
            bounds each blob read whole instead (0: none; blobs stay open until loaded).
        reader_nice: groups are loaded in asyncweights' own threads at this nice value (MLX's
            threads they start inherit it); None keeps normal priority.
        priority: ``"responsive"`` (the default) keeps the event loop first in line: tensor
            bytes are read in `read_chunk` pieces by threads at the lowest CPU priority
            (``SCHED_IDLE`` on Linux, else nice 19), so a waking event loop preempts them
            at once (a prototype of this read path kept p99 loop lag at 1.3-1.6 ms on a
            quiet 2-core VM). Those threads only run when no other thread wants a core: on
            a machine busy with other processes a load takes longer (about 2x measured at
            load average 11). ``"throughput"`` reads at normal priority in long pieces,
            for batch tools with no event loop to keep free; see `Limits.throughput`.
        read_chunk: bytes per read call, and the most a cancel waits for once a group
            started; None: 1 MiB when responsive, 32 MiB for throughput. The kernel does
            not preempt a thread inside one read, so shorter reads keep the loop free.
        pack_bytes: tensors of a group up to this size share one MLX buffer, as views;
            None (the default) packs every tensor of the group. One allocation and one
            read call per group is what makes a model of thousands of small blobs fast
            (and 6-12% faster on large ones, measured). The trade-off: a tensor kept alive
            keeps its group's whole buffer, at most `group_bytes` (or the one blob larger
            than that, alone in its group); a `stream_weights` consumer that keeps a few
            tensors of many groups should copy them or set 0 (one buffer per tensor).
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
    direct_read_bytes: int = 64 * 1024
    prefetch_bytes: int = 256 * MiB
    reader_nice: int | None = 10
    priority: Priority = "responsive"
    read_chunk: int | None = None
    pack_bytes: int | None = None
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

    @classmethod
    def throughput(cls, **changes: Any) -> Limits:
        """Limits for raw speed where no event loop needs the CPU (the CLI's ``load``).

        Normal-priority reads of 32 MiB, four groups of 64 MiB in flight: faster on a
        loaded machine, at the cost of tens of milliseconds of event-loop lag. At most 48
        blob files open (12 a group), so that with the process's own descriptors a load
        holds no more than 64 (64 blob files measured 65 in all on the small bench model).
        """
        base = cls(priority="throughput", workers=4, group_bytes=64 * MiB, max_open_files=48)
        return replace(base, **changes)

    @property
    def chunk_bytes(self) -> int:
        """Bytes per read call in effect (`read_chunk`, or the priority's default)."""
        if self.read_chunk is not None:
            return self.read_chunk
        return MiB if self.priority == "responsive" else 32 * MiB

    def __post_init__(self) -> None:
        for name in (
            "group_bytes",
            "max_open_files",
            "workers",
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
        if self.priority not in ("responsive", "throughput"):
            raise ValueError("Limits.priority must be 'responsive' or 'throughput'")
        if self.read_chunk is not None and self.read_chunk < 1:
            raise ValueError("Limits.read_chunk must be at least 1")
        if self.pack_bytes is not None and self.pack_bytes < 0:
            raise ValueError("Limits.pack_bytes must not be negative")
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
