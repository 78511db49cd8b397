"""Writes one shard: reads each planned file, checks it, encodes it, appends it.

Runs in a worker process; memory holds one image at a time. Files that fail
their checks are returned as rejects instead of written.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tfrecord_builder.example import encode_example
from tfrecord_builder.plan import ShardTask
from tfrecord_builder.png import ImageRejected, check_png
from tfrecord_builder.tfrecord import GzipTFRecordWriter

PROGRESS_EVERY = 256  # files between updates of the shared progress counter


@dataclass(frozen=True)
class ImageChecks:
    expected_size: int | None
    max_bytes: int
    max_pixels: int


@dataclass
class ShardResult:
    split: str
    relative_path: str
    examples: int = 0
    bytes: int = 0
    sha256: str = ""
    per_class: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)  # "RGB 8-bit" -> files
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, detail)


def read_file(path: str, max_bytes: int) -> bytes:
    try:
        # O_NONBLOCK: a FIFO swapped in after the walk must not hang the build.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ImageRejected("unreadable", error.strerror or str(error)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not_regular_file", "not a regular file (FIFO, socket or device)")
        size = info.st_size
        if size > max_bytes:
            raise ImageRejected("too_large", f"file is {size} bytes, over the {max_bytes}-byte limit")
        data = os.read(fd, size)
        # Read on to the end of the file: short reads happen on network file systems.
        while more := os.read(fd, 1 << 16):
            data += more
            if len(data) > max_bytes:
                raise ImageRejected("too_large", f"file grew past the {max_bytes}-byte limit while being read")
        return data
    except OSError as error:
        raise ImageRejected("unreadable", error.strerror or str(error)) from None
    finally:
        os.close(fd)


def write_shard(task: ShardTask, staging: Path, checks: ImageChecks, progress=None) -> ShardResult:
    result = ShardResult(split=task.split, relative_path=task.relative_path)
    target = staging / task.relative_path
    target.parent.mkdir(parents=True, exist_ok=True)
    unreported = 0
    with GzipTFRecordWriter(target) as writer:
        for path, label in task.items:
            try:
                checked = check_png(read_file(path, checks.max_bytes), checks.expected_size, checks.max_pixels)
            except ImageRejected as rejected:
                result.rejects.append((path, rejected.reason, rejected.detail))
            else:
                writer.write(encode_example(checked.png, label))
                result.per_class[label] += 1
                if checked.converted_from:
                    result.converted[checked.converted_from] += 1
            unreported += 1
            if progress is not None and unreported >= PROGRESS_EVERY:
                with progress.get_lock():
                    progress.value += unreported
                unreported = 0
    if progress is not None and unreported:
        with progress.get_lock():
            progress.value += unreported
    with open(target, "rb") as stream:
        os.fsync(stream.fileno())
    result.examples = writer.records
    result.bytes = writer.bytes_written
    result.sha256 = writer.sha256
    return result
