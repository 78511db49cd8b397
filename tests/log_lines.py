"""Which lines of a program's stderr are error-level: what a person reading a successful run must not see."""

from __future__ import annotations

import re

ERROR_LEVEL = (
    # TensorFlow's C++ logging (tsl): "2026-12-04 19:21:54.870243: E external/...cc:479] ..."
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [EF] \S+:\d+\]"),
    # absl / glog C++ logging: "E1204 19:21:54.870243  1234 file.cc:12] ..."
    re.compile(r"^[EF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]"),
    # Python logging in the formats this project and its libraries use: "<time> ERROR name: ...",
    # "ERROR name: ...", "ERROR:name:...", "CRITICAL ...".
    re.compile(r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ )?(?:ERROR|CRITICAL|FATAL)[ :]"),
    re.compile(r"^Traceback \(most recent call last\)"),
    re.compile(r"^(?:Error|error|Fatal Python error): "),  # the command's own error line, a crash
)


def error_lines(text: str | list[str]) -> list[str]:
    """The error-level lines of a program's output (a string, or a list of lines)."""
    lines = text.splitlines() if isinstance(text, str) else [line.rstrip("\n") for line in text]
    return [line for line in lines if any(pattern.match(line) for pattern in ERROR_LEVEL)]
