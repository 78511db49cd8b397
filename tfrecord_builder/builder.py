"""Builds the train/eval/test TFRecord shards of a mnist-png tree, atomically.

Walk the tree (every file becomes a candidate or a reject), plan splits and
shards, write the shards in parallel worker processes into a staging directory
beside the output, write the rejects report and the manifest last, then rename
the staging directory into place. An interrupted or failed build removes its
staging directory and leaves any previous output untouched; a build killed
outright leaves only a hidden staging directory that the next build removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from data import contract
from tfrecord_builder import formats
from tfrecord_builder import manifest as manifest_io
from tfrecord_builder.config import BUILDER_VERSION, BuildConfig
from tfrecord_builder.layout import Candidate, LayoutError, Reject, check_extra_root, check_root, walk
from tfrecord_builder.plan import make_plan
from tfrecord_builder.shard import ImageChecks, ShardResult, write_shard

ProgressCallback = Callable[[int, int], None]  # (files done, files planned)


class BuildError(Exception):
    """The build cannot produce a usable output; the message is one line for the user."""


@dataclass(frozen=True)
class BuildResult:
    output: Path
    manifest: dict
    seconds: float
    up_to_date: bool = False  # True: nothing was written, the existing build already matched


@dataclass(frozen=True)
class _Origin:
    """A build whose SOURCE was IDX files or a CSV (tfrecord_builder/formats.py), made from the
    mnist-png tree they were converted to: what the manifest says of the real source."""

    config: BuildConfig
    kind: str
    fingerprint: str  # of the source files
    converted: formats.Converted


def build(config: BuildConfig, on_progress: ProgressCallback | None = None) -> BuildResult:
    """Builds from an mnist-png tree, or from IDX files or a Kaggle CSV (converted first)."""
    try:
        kind = formats.detect(config.source.resolve()) if config.source.exists() else "png"
    except formats.FormatError as error:
        raise BuildError(str(error)) from None
    if kind == "png":
        return _build(config, on_progress)
    return _build_converted(config, kind, on_progress)


def _build_converted(config: BuildConfig, kind: str, on_progress) -> BuildResult:
    """IDX files or a CSV: checked whole and written as an mnist-png tree in a staging directory next
    to the output (removed after, and by the next build if this one is killed), then built as one."""
    started = time.perf_counter()
    source, output = config.source.resolve(), config.output.resolve()
    extras = [path.resolve() for path in config.extra_sources]
    try:
        for extra in extras:
            check_extra_root(extra)
        files = formats.source_files(source, kind)
    except (formats.FormatError, LayoutError) as error:
        raise BuildError(str(error)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output)
    extra_entries, _ = _walk_extras(extras)
    fingerprint = _combined(formats.source_fingerprint(files), extra_entries)
    if output.exists():
        if config.if_changed:
            current = _current_build(output, config, fingerprint)
            if current is not None:
                return BuildResult(output=output, manifest=current, seconds=time.perf_counter() - started,
                                   up_to_date=True)
        elif not config.overwrite:
            raise BuildError(f"{config.output} already exists; pass --overwrite to replace it")
    tree = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-source", dir=output.parent))
    try:
        try:
            converted = formats.convert(source, kind, tree, on_progress)
        except formats.FormatError as error:
            raise BuildError(str(error)) from None
        inner = replace(config, source=tree, if_changed=False, overwrite=True)
        result = _build(inner, on_progress, _Origin(config, kind, fingerprint, converted))
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return replace(result, seconds=time.perf_counter() - started)


def _build(config: BuildConfig, on_progress: ProgressCallback | None = None,
           origin: _Origin | None = None) -> BuildResult:
    started = time.perf_counter()
    source = config.source.resolve()
    extras = [path.resolve() for path in config.extra_sources]
    output = config.output.resolve()
    try:
        check_root(source)
        for extra in extras:
            check_extra_root(extra)
    except LayoutError as error:
        raise BuildError(str(error)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output)
    entries = None
    if output.exists():
        if config.if_changed:
            entries, extra_entries, queued = walk(source), *_walk_extras(extras)
            current = _current_build(output, config, _fingerprint(source, entries, extra_entries))
            if current is not None:
                return BuildResult(output=output, manifest=current, seconds=time.perf_counter() - started,
                                   up_to_date=True)
        elif not config.overwrite:
            raise BuildError(f"{config.output} already exists; pass --overwrite to replace it")

    # Worker processes start (spawn takes a while) while this process walks the tree.
    with _worker_pool(config.worker_count) as workers:
        if entries is None:
            entries, extra_entries, queued = walk(source), *_walk_extras(extras)
        # Only --if-changed needs it (next time); it costs ~0.25 s of stat calls per 70,000 files.
        fingerprint = _fingerprint(source, entries, extra_entries) if config.if_changed else None
        if origin is not None:
            fingerprint = origin.fingerprint
        candidates: list[Candidate] = []
        layout_rejects: list[Reject] = []
        for entry in entries:
            (candidates if type(entry) is Candidate else layout_rejects).append(entry)
        extra_candidates = _extra_candidates(extra_entries, layout_rejects)
        plan = make_plan(candidates, config, extra_candidates)
        total = sum(len(task.items) for task in plan.tasks)

        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the output should not be
        try:
            results = _write_shards(workers, plan.tasks, staging, _checks(config), total, on_progress)
            extra_summary = [
                {"path": str(extra), "training_files": sum(1 for c in extra_candidates if _under(c.path, extra)),
                 # A feedback tree's corrections by review state: only the accepted ones are training files.
                 "corrections": {"accepted": sum(1 for c in extra_candidates if _under(c.path, extra)),
                                 "pending": queued[extra][contract.PENDING_DIR],
                                 "rejected": queued[extra][contract.REJECTED_DIR]}}
                for extra in extras]
            manifest = _finish(staging, source, config, plan, results, layout_rejects,
                               len(candidates) + len(extra_candidates), fingerprint, extra_summary, origin)
            _publish(staging, output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return BuildResult(output=output, manifest=manifest, seconds=time.perf_counter() - started)


def _walk_extras(extras: list[Path]) -> tuple[list, dict]:
    """The --extra-source trees' entries that count (their accepted digits), and their review queues' sizes."""
    walked, queued = [], {}
    for extra in extras:
        entries, queued[extra] = _without_review_queue(extra, walk(extra))
        walked.append((extra, entries))
    return walked, queued


# Options that change what is written (not how fast, nor what happens to an existing output).
_OUTPUT_OPTIONS = ("eval_fraction", "per_class", "test_per_class", "shards", "seed", "expected_size", "max_bytes",
                   "max_pixels", "extra_sources")


def _option(config: BuildConfig, name: str):
    """An option as the manifest records it (JSON: paths as strings)."""
    value = getattr(config, name)
    return [str(path) for path in value] if name == "extra_sources" else value


def _under(path: str, root: Path) -> bool:
    return path.startswith(str(root) + os.sep)


# What a feedback tree (web/feedback.py) holds besides its accepted training/ digits: counted, never read.
_REVIEW_STATES = (contract.PENDING_DIR, contract.REJECTED_DIR)
_FEEDBACK_FILES = (contract.FEEDBACK_LOG, contract.REVIEW_LOG, contract.FEEDBACK_LOCK)


def _without_review_queue(root: Path, entries) -> tuple[list, dict[str, int]]:
    """An extra source's entries without its corrections that no reviewer accepted (pending/ and
    rejected/), the feedback store's own files and its tally sheets (sheets/), and how many there were of each state. They are
    not part of the build, nor of its fingerprint: a new proposal does not make --if-changed rebuild.

    In a feedback tree (it has the store's log), a training/ image is used only if reviews.jsonl
    accepted it as that digit; any other (written by a version without review, copied in by hand, or
    moved there by a crash before its review line) is reported as `unreviewed`, never trained on."""
    prefixes = {state: str(root / state) + os.sep for state in _REVIEW_STATES}
    own = {str(root / name) for name in _FEEDBACK_FILES}
    sheets = str(root / contract.SHEETS_DIR) + os.sep
    accepted = _accepted(root) if (root / contract.FEEDBACK_LOG).exists() or (root / contract.REVIEW_LOG).exists() \
        else None
    kept, counts = [], {state: 0 for state in _REVIEW_STATES}
    for entry in entries:
        state = next((s for s, prefix in prefixes.items() if entry.path.startswith(prefix)), None)
        if state is not None:
            counts[state] += entry.path.endswith(".png") and not os.path.basename(entry.path).startswith(".")
        elif entry.path in own or entry.path.startswith(sheets):
            continue
        elif accepted is not None and type(entry) is Candidate and entry.part == contract.TRAINING_DIR \
                and accepted.get(Path(entry.path).stem) != entry.label:
            kept.append(Reject(entry.path, "unreviewed", "a correction no reviewer accepted as this digit "
                               f"(not in {contract.REVIEW_LOG}): see digits feedback review"))
        else:
            kept.append(entry)
    return kept, counts


def _accepted(root: Path) -> dict[str, int]:
    """id -> digit of every correction reviews.jsonl accepted (a line that is not JSON is skipped)."""
    accepted = {}
    try:
        with open(root / contract.REVIEW_LOG, encoding="utf-8", errors="replace") as log:
            for text in log:
                try:
                    line = json.loads(text)
                except ValueError:
                    continue
                if isinstance(line, dict) and line.get("verdict") == contract.REVIEW_ACCEPTED \
                        and isinstance(line.get("digit"), int):
                    accepted[str(line.get("id"))] = line["digit"]
    except FileNotFoundError:
        pass
    return accepted


def _extra_candidates(extra_entries, layout_rejects: list[Reject]) -> list[Candidate]:
    """The training digits of the --extra-source trees; their testing/ files are reported, not used."""
    found = []
    for root, entries in extra_entries:
        for entry in entries:
            if type(entry) is Candidate:
                if entry.part == contract.TRAINING_DIR:
                    found.append(entry)
                else:
                    layout_rejects.append(Reject(entry.path, "extra_testing", "an extra source adds training "
                                                 "digits only: the held-out test split comes from SOURCE"))
            else:
                layout_rejects.append(entry)
    return found


def _fingerprint(source: Path, entries, extra_entries) -> str:
    """The source tree's fingerprint; with extra sources, one over all of them."""
    return _combined(source_fingerprint(source, entries), extra_entries)


def _combined(main: str, extra_entries) -> str:
    if not extra_entries:
        return main
    parts = [main, *(f"{root} {source_fingerprint(root, found)}" for root, found in extra_entries)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def source_fingerprint(source: Path, entries) -> str:
    """SHA-256 over every entry's path, size and modification time: changes when the tree does."""
    prefix = len(str(source)) + 1  # entries are paths under `source` (os.path.relpath is 10x slower)
    lines = []
    for entry in entries:
        try:
            info = os.lstat(entry.path)
            lines.append(f"{entry.path[prefix:]} {info.st_size} {info.st_mtime_ns}")
        except OSError as error:
            lines.append(f"{entry.path[prefix:]} error {error.errno}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _current_build(output: Path, config: BuildConfig, fingerprint: str) -> dict | None:
    """The existing build's manifest if it was made from this very tree with these options, else None."""
    try:
        manifest = manifest_io.verify(output)
    except (manifest_io.ManifestError, KeyError, OSError):
        return None
    options = manifest.get("options", {})
    same = (
        manifest.get("builder_version") == BUILDER_VERSION
        and manifest.get("source_fingerprint") == fingerprint
        and all(options.get(name, [] if name == "extra_sources" else None) == _option(config, name)
                for name in _OUTPUT_OPTIONS)
    )
    return manifest if same else None


def _checks(config: BuildConfig) -> ImageChecks:
    return ImageChecks(config.expected_size, config.max_bytes, config.max_pixels)


class _Workers:
    """A few spawned processes writing shards from a task queue.

    Hand-rolled because both stock pools fail the user here: multiprocessing.Pool
    silently replaces a worker that dies and then waits forever for its shard, and
    ProcessPoolExecutor has no way to stop running workers on Ctrl-C.
    """

    def __init__(self, count: int):
        # spawn, not fork: the caller may have imported TensorFlow, whose threads do not survive fork.
        context = multiprocessing.get_context("spawn")
        self.done = context.Value("q", 0)  # files processed, summed over workers
        self._finished = False
        self._tasks = context.Queue()
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_worker_main, args=(self._tasks, self._results, self.done), daemon=True)
            for _ in range(count)
        ]
        for process in self._processes:
            process.start()

    def run(self, tasks, staging: Path, checks: ImageChecks, total: int, on_progress) -> list[ShardResult]:
        # Largest shards first, so that the last ones to finish are small (better balance).
        for index, task in sorted(enumerate(tasks), key=lambda item: -len(item[1].items)):
            self._tasks.put((index, task, staging, checks))
        for _ in self._processes:
            self._tasks.put(None)
        results: dict[int, ShardResult] = {}
        while len(results) < len(tasks):
            try:
                index, error, result = self._results.get(timeout=0.05)
            except queue.Empty:
                if any(process.exitcode not in (None, 0) for process in self._processes):
                    raise BuildError("a worker process died (killed or out of memory); nothing was written") from None
                if on_progress:
                    on_progress(self.done.value, total)
                continue
            if error:
                raise BuildError(f"writing {tasks[index].relative_path} failed: {error}")
            results[index] = result
        self._finished = True
        return [results[index] for index in range(len(tasks))]

    def stop(self) -> None:
        if self._finished:
            # Every worker has its end-of-work marker: let each exit on its own, even one still
            # starting up. Killing a spawned child mid-start can leave a semaphore behind that the
            # resource tracker then reports on stderr at exit.
            for process in self._processes:
                process.join(timeout=30)
        self._tasks.cancel_join_thread()  # never block exit on tasks nobody will read
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join(timeout=10)


def _worker_main(tasks, results, done) -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (item := tasks.get()) is not None:
        index, task, staging, checks = item
        try:
            results.put((index, None, write_shard(task, staging, checks, done)))
        except Exception as error:  # reported to the parent, which fails the build with it
            results.put((index, f"{type(error).__name__}: {error}", None))


@contextlib.contextmanager
def _worker_pool(count: int):
    """Worker processes, or None to write shards in this process when one worker is asked for."""
    if count == 1:
        yield None
        return
    workers = _Workers(count)
    try:
        yield workers
    finally:
        workers.stop()


def _write_shards(workers, tasks, staging: Path, checks: ImageChecks, total: int, on_progress) -> list[ShardResult]:
    if workers is not None:
        return workers.run(tasks, staging, checks, total, on_progress)
    results = []
    for task in tasks:
        results.append(write_shard(task, staging, checks))
        if on_progress:
            on_progress(sum(len(r.rejects) + r.examples for r in results), total)
    return results


def _finish(staging, source, config, plan, results, layout_rejects, candidates, fingerprint,
            extra_sources: list[dict], origin: _Origin | None = None) -> dict:
    rejects = [(r.path, r.reason, r.detail) for r in layout_rejects]
    for result in results:
        rejects.extend(result.rejects)
    rejects = [(os.path.relpath(path, source), reason, detail) for path, reason, detail in rejects]
    if origin is not None:  # records of the IDX files or CSV refused before they became PNGs
        rejects.extend(origin.converted.rejects)
        candidates += len(origin.converted.rejects)
    rejects.sort()
    by_reason = Counter(reason for _, reason, _ in rejects)
    with open(staging / manifest_io.REJECTS_NAME, "w") as report:
        for path, reason, detail in rejects:
            report.write(json.dumps({"path": path, "reason": reason, "detail": detail}) + "\n")

    splits = {}
    for split in contract.SPLITS:
        mine = sorted((r for r in results if r.split == split), key=lambda r: r.relative_path)
        per_class = Counter()
        for result in mine:
            per_class.update(result.per_class)
        splits[split] = {
            "examples": sum(r.examples for r in mine),
            "per_class": {str(label): per_class[label] for label in range(contract.NUM_CLASSES)},
            "shards": [
                {"file": r.relative_path, "examples": r.examples, "bytes": r.bytes, "sha256": r.sha256} for r in mine
            ],
        }
    written = sum(split["examples"] for split in splits.values())
    seen = len(layout_rejects) + candidates
    empty = [split for split, info in splits.items() if info["examples"] == 0]
    if empty:
        reasons = ", ".join(f"{reason} {count}" for reason, count in by_reason.most_common()) or "none"
        raise BuildError(
            f"no valid digits for the {'/'.join(empty)} split(s) under {source}: "
            f"{seen} files seen, {written} valid, {len(rejects)} rejected (reasons: {reasons}); nothing written"
        )
    converted = Counter()
    for result in results:
        converted.update(result.converted)

    shards = [shard for split in splits.values() for shard in split["shards"]]
    shown = origin.config if origin is not None else config  # the options as given, not the converted tree's
    options = asdict(shown)
    options.update(source=str(shown.source), output=str(shown.output), workers=config.worker_count,
                   extra_sources=_option(shown, "extra_sources"))
    manifest = {
        "builder_version": BUILDER_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_root": str(origin.config.source.resolve()) if origin is not None else str(source),
        "source_format": origin.kind if origin is not None else "png",
        "source_files": origin.converted.files if origin is not None else None,
        "source_fingerprint": fingerprint,
        "extra_sources": extra_sources,  # trees whose training/ digits were added to the train split
        "options": options,
        "contract": {
            "image_key": contract.IMAGE_KEY,
            "label_key": contract.LABEL_KEY,
            "num_classes": contract.NUM_CLASSES,
            "image_encoding": "PNG, 8-bit grayscale",
            "compression": "GZIP",
        },
        "counts": {
            "seen": seen,
            "written": written,
            "rejected": len(rejects),
            "not_selected": plan.not_selected,
            "converted": sum(converted.values()),
        },
        "splits": splits,
        "converted": dict(converted),
        "rejects": {"file": manifest_io.REJECTS_NAME, "by_reason": dict(by_reason.most_common())},
        "checksum": manifest_io.combined_checksum(shards),
    }
    # Every file is written or rejected (or left out on purpose by --per-class).
    if seen != written + len(rejects) + plan.not_selected:
        raise BuildError(f"internal accounting error, nothing written: {manifest['counts']}")
    manifest_io.write_manifest(staging, manifest)
    return manifest


def _publish(staging: Path, output: Path) -> None:
    """Moves the finished staging directory to `output`, replacing an old build."""
    _fsync_dir(staging)
    if output.exists():
        retired = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.rename(output, retired)
        os.rename(staging, output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, output)
    _fsync_dir(output.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_staging(output: Path) -> None:
    """Removes staging/retired directories left by builds that were killed outright."""
    ours = re.compile(rf"^\.{re.escape(output.name)}\.(?:tmp-(\d+)-[A-Za-z0-9_]+|old-(\d+))$")
    for leftover in output.parent.iterdir():
        match = ours.match(leftover.name)
        if match and leftover.is_dir() and not process_alive(int(match.group(1) or match.group(2))):
            shutil.rmtree(leftover, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
