"""TFX's Pusher, except that it never pushes a model the serving directory already holds.

Re-running the pipeline with nothing changed reuses the cached Trainer output, re-evaluates it
against itself (the latest blessed model), blesses it and, with TFX's own Pusher, copies the
identical SavedModel again under a new version number. With the default version policy (the
newest two) a second copy then pushes the last genuinely different model out of what the server
loads, and a rollback has nowhere to go. This executor compares the blessed model's files with
every version already in the destination and skips the push when one is identical, recording
which version it is (`already_served_as`) for the run report.
"""

from __future__ import annotations

import hashlib
import os

from absl import logging
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import proto_utils

ALREADY_SERVED_AS = "already_served_as"  # custom property of the pushed_model artifact
CHUNK = 1 << 20


def _files(root: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file under root, sorted: cheap to compare before hashing."""
    found = []
    for directory, _, names in fileio.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            found.append((os.path.relpath(path, root), fileio.stat(path).length))
    return sorted(found)


def _digest(root: str, files: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for relative, _ in files:
        digest.update(relative.encode() + b"\0")
        with fileio.open(os.path.join(root, relative), "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def identical_version(model_path: str, base_directory: str) -> str | None:
    """The version under base_directory whose files equal model_path's, byte for byte, or None."""
    if not fileio.isdir(base_directory):
        return None
    files = _files(model_path)
    candidate = None
    for version in sorted((name.rstrip("/") for name in fileio.listdir(base_directory)), reverse=True):
        served = os.path.join(base_directory, version)
        if not version.isdigit() or not fileio.isdir(served) or _files(served) != files:
            continue
        candidate = candidate or _digest(model_path, files)
        if _digest(served, files) == candidate:
            return version
    return None


class DeduplicatingPusherExecutor(pusher_executor.Executor):
    """Pushes a blessed model as TFX's Pusher does, unless the destination already has it."""

    def Do(self, input_dict, output_dict, exec_properties) -> None:  # noqa: N802 (TFX's interface)
        destination = pusher_pb2.PushDestination()
        proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination)
        if destination.WhichOneof("destination") == "filesystem" and self.CheckBlessing(input_dict):
            existing = identical_version(self.GetModelPath(input_dict), destination.filesystem.base_directory)
            if existing is not None:
                model_push = artifact_utils.get_single_instance(
                    output_dict[standard_component_specs.PUSHED_MODEL_KEY])
                logging.info("Model is identical to version %s in %s: not pushed again.", existing,
                             destination.filesystem.base_directory)
                self._MarkNotPushed(model_push)
                model_push.set_string_custom_property(ALREADY_SERVED_AS, existing)
                return
        super().Do(input_dict, output_dict, exec_properties)
