"""Where the pipeline's data, artifacts and models live: a local path, or a filesystem URI.

TFX does its file work through `tf.io.gfile`, which reads and writes `gs://`, `s3://` (with
tensorflow-io), `hdfs://` and more. So a location stays a string end to end: a URI exactly as the
user gave it (no `Path()`, which would turn `gs://b/x` into `gs:/b/x`), a local path made absolute
(components run with another working directory).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (gs, s3, hdfs, ram...), False for a local path."""
    return bool(_SCHEME.match(str(location)))


def normalize(location: str | os.PathLike) -> str:
    """A URI without its trailing slashes; a local path absolute and resolved."""
    text = str(location)
    if not text:
        raise ValueError("an empty location")
    scheme = _SCHEME.match(text)
    if scheme:
        if text.startswith("file://"):
            return str(Path(text[len("file://"):]).resolve())
        if not text[scheme.end():].strip("/"):
            raise ValueError(f"{text!r} names no bucket or directory")
        return text.rstrip("/")
    return str(Path(text).resolve())


def join(base: str, *parts: str) -> str:
    """base/part/...: '/'-joined for URIs (os.path.join would do the same on POSIX, but not on Windows)."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])
    return os.path.join(base, *parts)
