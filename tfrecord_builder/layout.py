"""Walks a Kaggle mnist-png tree and sorts every entry into a candidate or a reject.

The layout is ROOT/<training|testing>/<digit 0-9>/<name>.png. Every file below the
root is accounted for: a candidate for the builder to read, or a reject with a
reason (hidden, outside the layout, bad label directory, wrong extension, not a
regular file, unreadable, symlink loop). Symlinked files and directories are
followed; a directory reached twice is reported instead of walked again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Union

from data import contract

_LABEL_DIRS = {str(digit): digit for digit in range(contract.NUM_CLASSES)}


class Candidate(NamedTuple):  # a tuple: the walk makes one per file, 70,000 for full MNIST
    path: str
    part: str  # contract.TRAINING_DIR or contract.TESTING_DIR
    label: int


class Reject(NamedTuple):
    path: str
    reason: str
    detail: str


Entry = Union[Candidate, Reject]


class LayoutError(Exception):
    """The root cannot be walked at all (missing, not a directory, wrong layout)."""


def check_root(root: Path) -> None:
    if not root.exists():
        raise LayoutError(f"{root} does not exist")
    if not root.is_dir():
        raise LayoutError(f"{root} is not a directory")
    missing = [part for part in contract.SOURCE_DIRS if not (root / part).is_dir()]
    if missing:
        raise LayoutError(
            f"{root} has no {' or '.join(m + '/' for m in missing)} directory "
            f"(expected the mnist-png layout ROOT/{{training,testing}}/<digit>/<n>.png)"
        )


def check_extra_root(root: Path) -> None:
    """An --extra-source tree: only its training/ digits are used (a testing/ is reported, not used)."""
    if not root.exists():
        raise LayoutError(f"extra source {root} does not exist")
    if not root.is_dir():
        raise LayoutError(f"extra source {root} is not a directory")
    # A feedback tree (web/feedback.py) may have nothing accepted yet: only pending/ or rejected/.
    if not any((root / part).is_dir() for part in (contract.TRAINING_DIR, contract.PENDING_DIR,
                                                    contract.REJECTED_DIR)):
        raise LayoutError(f"extra source {root} has no {contract.TRAINING_DIR}/ directory "
                          f"(expected ROOT/{contract.TRAINING_DIR}/<digit>/<name>.png, as `digits web` writes)")


def walk(root: Path) -> list[Entry]:
    """Every file under `root`, in a deterministic (sorted) order."""
    entries: list[Entry] = []
    root_stat = os.stat(root)
    root_key = (root_stat.st_dev, root_stat.st_ino)
    _walk_dir(str(root), (), [root_key], {root_key}, entries)
    return entries


def _walk_dir(directory: str, rel: tuple[str, ...], ancestors: list, visited: set, out: list[Entry]) -> None:
    try:
        with os.scandir(directory) as listing:
            children = sorted(listing, key=lambda entry: entry.name)
    except OSError as error:
        out.append(Reject(directory, "unreadable", f"directory cannot be listed: {error.strerror}"))
        return
    # The layout's leaf: training|testing/<digit>/, where every digit PNG lives.
    label = _LABEL_DIRS.get(rel[1]) if len(rel) == 2 and rel[0] in contract.SOURCE_DIRS else None
    for entry in children:
        name = entry.name
        if label is not None and not name.startswith(".") and name[-4:].lower() == ".png" and _is_file(entry):
            out.append(Candidate(entry.path, rel[0], label))  # the common case, kept cheap
            continue
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError as error:
            out.append(_unreadable(entry.path, error))
            continue
        if not is_dir:
            out.append(_classify_file(entry, rel + (name,)))
            continue
        try:
            info = entry.stat()
        except OSError as error:
            out.append(_unreadable(entry.path, error))
            continue
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            out.append(Reject(entry.path, "symlink_loop", "symlink points back to a directory that contains it"))
        elif key in visited:
            out.append(Reject(entry.path, "symlink_loop", "directory already walked through another path"))
        else:
            visited.add(key)
            ancestors.append(key)
            _walk_dir(entry.path, rel + (name,), ancestors, visited, out)
            ancestors.pop()


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # e.g. a symlink loop; the slow path below reports it
        return False


def _unreadable(path: str, error: OSError) -> Reject:
    if error.errno == 40:  # ELOOP: a symlink that resolves to itself
        return Reject(path, "symlink_loop", "symlink resolves to itself (too many levels of symbolic links)")
    return Reject(path, "unreadable", error.strerror or str(error))


def _classify_file(entry: os.DirEntry, rel: tuple[str, ...]) -> Entry:
    path = entry.path
    if any(part.startswith(".") for part in rel):
        return Reject(path, "hidden", "hidden file or directory")
    # DirEntry.is_file() answers from the directory listing, without a stat call,
    # except for symlinks, which it follows.
    if not entry.is_file():
        if entry.is_symlink():
            try:
                os.stat(path)
            except OSError as error:
                return _unreadable(path, error)
        return Reject(path, "not_regular_file", "not a regular file (FIFO, socket or device)")
    if len(rel) != 3 or rel[0] not in contract.SOURCE_DIRS:
        return Reject(path, "not_in_layout", "not at training/<digit>/<name>.png or testing/<digit>/<name>.png")
    label = _LABEL_DIRS.get(rel[1])
    if label is None:
        return Reject(path, "bad_label", f"label directory {rel[1]!r} is not a digit 0-9")
    if not rel[2].lower().endswith(".png"):
        return Reject(path, "wrong_extension", "file name does not end in .png")
    return Candidate(path=path, part=rel[0], label=label)
