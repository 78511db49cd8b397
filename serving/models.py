"""Model versions on disk -> loaded, warmed-up servables, kept in line with the version policy.

TF Serving's life cycle, as its status API reports it: a version found under the
base path is LOADING, then AVAILABLE once loaded and warmed up; a version the
policy no longer wants is UNLOADING, then END. Loading happens beside serving: the
old version answers until the new one is AVAILABLE, and a request that picked a
version keeps it until it is answered, so a switch fails no request.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.python.util import deprecation
from tensorflow_serving.apis import get_model_metadata_pb2

from components.reference import profile_path, read_reference_profile
from data import contract
from serving import runtime
from serving.batching import NO_CALLER, Arrival, Batcher, Caller
from serving.config import ServerConfig
from serving.errors import first_line, invalid_argument, not_found
from serving.metrics import ServingMetrics
from serving.signature import Limits, Signature
from serving.version_policy import LOAD, Versions, next_action, wanted_versions

log = logging.getLogger(__name__)

LOADING, AVAILABLE, UNLOADING, END = "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""


class InFlight:
    """Counts the requests holding something, and lets one wait until none do."""

    def __init__(self):
        self._count = 0
        self._idle = threading.Condition()

    @property
    def count(self) -> int:
        return self._count

    def enter(self, limit: int | None = None) -> bool:
        """Counts one more, unless `limit` are already counted (then False)."""
        with self._idle:
            if limit is not None and self._count >= limit:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until none is counted; False if some still are after `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=timeout)


class Servable:
    """One loaded version: its session, its signatures and, with batching on, one batcher per signature.

    Loaded as TF Serving loads a SavedModel: its MetaGraph imported into a graph of its own and
    run through a Session (the `TF1` runtime of TF Serving's metrics), not rebuilt as TF2 Python
    objects. Measured on this project's model: 2.3 s instead of 6.2 s to load, 21 thousand
    Python objects instead of 448 thousand, identical outputs and call times; so a load or an
    unload stalls the server's other threads far less (docs/performance.md).
    """

    def __init__(self, config: ServerConfig, version: int, path: Path, metrics: ServingMetrics):
        self.version = version
        self.path = path
        self._model_name = config.model_name
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=config.intra_op_threads,
            inter_op_parallelism_threads=config.inter_op_threads))
        # TensorFlow marks the v1 loader deprecated in favour of tf.saved_model.load, the very object
        # rebuilding this server avoids on purpose (see above): its notice would only mislead.
        with self._graph.as_default(), deprecation.silence():
            meta_graph = tf.compat.v1.saved_model.load(self._session, [tf.saved_model.SERVING], str(path))
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = dict(meta_graph.signature_def)
        batching = config.batching
        limits = Limits(config.max_instances, config.max_image_bytes, config.max_image_pixels,
                        config.max_request_pixels, config.signature_image_input,
                        batch_limit=batching.max_batch_size if batching.enabled else None)
        self.signatures = {name: Signature(name, signature_def, self._runner(signature_def), limits)
                           for name, signature_def in self.signature_defs.items()
                           if not name.startswith("__")}  # __saved_model_init_op is not for requests
        self._batchers: dict[str, Batcher] = {}
        self._holders = InFlight()  # requests that hold this version (ModelManager.lease)
        self._metadata: dict | None = None
        if batching.enabled:
            for name, signature in self.signatures.items():
                if signature.batchable:
                    self._batchers[name] = Batcher(
                        signature.run, batching, f"{config.model_name}-{version}-{name}",
                        on_stats=metrics.record_batching,
                        locate=lambda parts, signature=signature: [signature.undecodable(p) for p in parts])

    def _runner(self, signature_def: meta_graph_pb2.SignatureDef):
        """The model call of one signature: feeds its inputs' tensors, fetches its outputs' (by alias)."""
        feeds = {alias: self._graph.get_tensor_by_name(info.name) for alias, info in signature_def.inputs.items()}
        fetches = {alias: self._graph.get_tensor_by_name(info.name) for alias, info in signature_def.outputs.items()}
        session = self._session

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return session.run(fetches, {feeds[alias]: value for alias, value in inputs.items()})

        return run

    # -- requests ----------------------------------------------------------------------------

    def arrival(self, signature: Signature) -> Arrival | contextlib.nullcontext:
        """Marks a request on its way to the signature's batch queue (see serving/batching.py)."""
        batcher = self._batchers.get(signature.name)
        return batcher.arrival() if batcher is not None else contextlib.nullcontext()

    def run(self, signature: Signature, inputs: dict[str, np.ndarray], size: int, caller: Caller = NO_CALLER,
            arrival: Arrival | None = None) -> dict[str, np.ndarray]:
        """Runs checked inputs (`signature.check`), batched with concurrent requests when batching is on.

        What TF Serving times as runtime_latency: its session's Run, which with batching
        includes the wait in the batch queue.
        """
        batcher = self._batchers.get(signature.name)
        if batcher is not None:
            return batcher.run(inputs, size, caller, arrival)
        lost = caller.lost(time.monotonic(), queued=False)
        if lost is not None:
            raise lost
        return signature.run(inputs)

    def enter(self) -> None:
        """A request holds this version (ModelManager.lease counts it as it resolves it)."""
        self._holders.enter()

    def leave(self) -> None:
        self._holders.leave()

    def signature_def_map(self) -> get_model_metadata_pb2.SignatureDefMap:
        """The whole SignatureDef map of the MetaGraph, as TF Serving's GetModelMetadata returns it."""
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in self.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature_def)
        return signature_map

    def metadata_json(self) -> dict:
        """GetModelMetadataResponse as TF Serving's REST API prints it, made once per version."""
        if self._metadata is None:
            signature_map = self.signature_def_map()
            self._metadata = {
                "model_spec": {"name": self._model_name, "signature_name": "", "version": str(self.version)},
                # Yes, `signature_def` twice: TF Serving's JSON of the SignatureDefMap inside `metadata`.
                "metadata": {"signature_def": json_format.MessageToDict(
                    signature_map, including_default_value_fields=True, preserving_proto_field_name=True)},
            }
        return self._metadata

    # -- life cycle ------------------------------------------------------------------------------

    def warm_up(self) -> int:
        """Replays the model's own warmup requests (TF Serving's assets.extra convention)."""
        from components.warmup import read_warmup_requests, warmup_path  # owns the file's name and format

        if not os.path.exists(warmup_path(str(self.path))):
            return 0
        requests = read_warmup_requests(str(self.path))
        for request in requests:
            name = request.model_spec.signature_name or contract.SERVING_SIGNATURE
            if name not in self.signatures:
                raise ValueError(f"warmup request for signature {name!r}, which the model does not have")
            # The model's own requests: not held to the per-request limits meant for clients.
            signature = self.signatures[name]
            signature.run({alias: tf.make_ndarray(tensor) for alias, tensor in request.inputs.items()})
        return len(requests)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until no request holds this version (new ones resolve elsewhere); False on timeout."""
        return self._holders.wait_idle(timeout)

    def release(self) -> None:
        """Closes the session and drops the graph, signatures and batchers, so that their memory is freed."""
        self.signatures = {}
        self._batchers = {}
        self._session.close()
        self._session = self._graph = None


class ModelManager:
    """Loads and unloads the versions of one model as they appear in and leave its base path."""

    def __init__(self, config: ServerConfig, metrics: ServingMetrics):
        self._config = config
        self._metrics = metrics
        self._lock = threading.Lock()
        self._servables: dict[int, Servable] = {}
        self._status: dict[int, VersionStatus] = {}
        self._failed: dict[int, tuple] = {}  # version -> directory fingerprint it failed with
        self._seen: dict[int, tuple] = {}  # version -> fingerprint at the previous poll
        self._profiles: dict[int, dict] = {}  # loaded version -> its reference profile, if it has a valid one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self._config.model_name

    def load_existing(self) -> None:
        """Loads the versions on disk now, so that the server opens with its model."""
        self.poll(settle=False)

    def start_polling(self) -> None:
        """Watches the base path in the background for versions that come and go."""
        self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stops polling (a load under way is not interrupted: TensorFlow cannot be); False if the
        poller is still busy after `timeout` seconds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._config.poll_interval_s):
            try:
                self.poll()
            except Exception:  # a bad poll must not end polling
                log.exception("polling %s failed", self._config.model_base_path)

    def poll(self, settle: bool = True) -> None:
        """One pass: scan the base path, then load and unload as the version policy says
        (serving/version_policy.py), one action at a time, until it has nothing more to do.

        With `settle`, a version directory is loaded only once it looks the same on two
        polls in a row, so a version still being copied in (the Pusher copies file by
        file) is not loaded half-written.
        """
        on_disk = self._versions_on_disk()
        # Only the wanted versions not loaded yet are fingerprinted: loaded ones are not walked on every poll.
        fingerprints = {version: _fingerprint(on_disk[version])
                        for version in wanted_versions(on_disk, self._config.num_versions)
                        if version not in self._servables}
        unsettled = set()
        for version, fingerprint in fingerprints.items():
            previous, self._seen[version] = self._seen.get(version), fingerprint
            if settle and previous != fingerprint:
                unsettled.add(version)
        while not self._stop.is_set():  # shutting down: load and unload nothing more
            failed = {version for version, fingerprint in fingerprints.items()
                      if self._failed.get(version) == fingerprint}
            action = next_action(Versions.of(on_disk, self._servables, failed, unsettled), self._config.num_versions)
            if action is None:
                break
            if action.kind == LOAD:
                self._load(action.version, on_disk[action.version], fingerprints[action.version])
            else:
                self._unload(action.version)
        for version in list(self._status):
            if version not in on_disk and version not in self._servables and self._status[version].state != END:
                self._set_status(VersionStatus(version, END))

    def _versions_on_disk(self) -> dict[int, Path]:
        base = self._config.model_base_path
        try:
            entries = list(os.scandir(base))
        except OSError:
            return {}
        return {int(entry.name): Path(entry.path) for entry in entries
                if entry.name.isdigit() and entry.is_dir() and os.path.exists(os.path.join(entry.path, "saved_model.pb"))}

    def _load(self, version: int, path: Path, fingerprint: tuple) -> None:
        self._set_status(VersionStatus(version, LOADING))
        started = time.monotonic()
        log.info("loading %s version %d from %s", self.name, version, path)
        try:
            servable = Servable(self._config, version, path, self._metrics)
            warmup_started = time.monotonic()
            warmed = servable.warm_up() if self._config.warmup else 0
            warmup_seconds = time.monotonic() - warmup_started
        except Exception as error:  # any failure to load is reported in the version's status
            message = f"Failed to load servable {self.name} version {version}: {first_line(error, type(error).__name__)}"
            log.error("%s", message)
            self._failed[version] = fingerprint
            self._metrics.record_load(str(path), ok=False, seconds=time.monotonic() - started)
            self._set_status(VersionStatus(version, END, "UNKNOWN", message))
            return
        seconds = time.monotonic() - started
        runtime.lower_compute_priority()  # TensorFlow's pools exist once the model has run (its warmup)
        self._metrics.record_load(str(path), ok=True, seconds=seconds, warmup_seconds=warmup_seconds if warmed else None)
        profile = load_reference_profile(self.name, version, path)
        with self._lock:
            self._servables[version] = servable
            if profile is not None:
                self._profiles[version] = profile
        self._failed.pop(version, None)
        self._set_status(VersionStatus(version, AVAILABLE))
        self._publish_versions()
        log.info("%s version %d AVAILABLE after %.1f s (%d warmup requests)", self.name, version, seconds, warmed)

    def _unload(self, version: int) -> None:
        self._set_status(VersionStatus(version, UNLOADING))
        with self._lock:
            servable = self._servables.pop(version)
            self._profiles.pop(version, None)
        self._publish_versions()
        servable.wait_idle()  # requests holding it finish; new ones resolve to other versions
        servable.release()
        del servable
        _free_memory()
        self._set_status(VersionStatus(version, END))
        log.info("%s version %d unloaded", self.name, version)

    def _publish_versions(self) -> None:
        """The loaded versions and their reference profiles, on the metrics page."""
        with self._lock:
            versions = sorted(self._servables)
            profiles = {version: self._profiles[version] for version in versions if version in self._profiles}
        self._metrics.set_loaded_versions(self.name, versions)
        self._metrics.set_reference_profiles(self.name, profiles)

    def _set_status(self, status: VersionStatus) -> None:
        """A version's new state, in GetModelStatus and in the version-state gauge at once (an unloaded
        version stays END with OK in both; a failed load END with its error code until it loads)."""
        with self._lock:
            self._status[status.version] = status
            self._metrics.set_version_states(self.name, [(known.version, known.state, known.error_code)
                                                         for known in self._status.values()])

    # -- lookups for requests --------------------------------------------------------------

    def _labelled(self, version: int | None, label: str | None) -> int | None:
        """The version a request names, directly or through a version label."""
        if label is None:
            return version
        labels = self._config.label_map
        if label not in labels:
            raise invalid_argument(f"Unrecognized servable version label: {label}")
        return labels[label]

    @contextlib.contextmanager
    def lease(self, name: str, version: int | None = None, label: str | None = None) -> Iterator[Servable]:
        """The servable a request names, held for the request: counted in flight in the same step that
        finds it, so no unload can slip between finding it and using it."""
        with self._lock:
            servable = self._resolve(name, version, label)
            servable.enter()
        try:
            yield servable
        finally:
            servable.leave()

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request names, for a quick look (status, metadata); see `lease` to use it."""
        with self._lock:
            return self._resolve(name, version, label)

    def _resolve(self, name: str, version: int | None, label: str | None) -> Servable:
        """A version, a label, or (neither) the newest available version; under self._lock."""
        if name != self.name:
            raise not_found(f"Servable not found for request: Latest({name})")
        version = self._labelled(version, label)
        if version is not None:
            servable = self._servables.get(version)
            if servable is None:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return servable
        if not self._servables:
            raise not_found(f"Servable not found for request: Latest({name})")
        return self._servables[max(self._servables)]

    def statuses(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        if name != self.name:
            raise not_found(f"Could not find any versions of model {name}")
        version = self._labelled(version, label)
        with self._lock:
            if version is not None:
                if version not in self._status:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [self._status[version]]
            if not self._status:
                raise not_found(f"Could not find any versions of model {name}")
            return [self._status[v] for v in sorted(self._status, reverse=True)]

    def available_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._servables)


def load_reference_profile(model_name: str, version: int, path: Path) -> dict | None:
    """A version's reference profile (components/reference.py), or None with one warning line.

    A version without one (exported before profiles existed) or with a broken one still
    serves: the profile only feeds drift gauges, which are better absent than wrong.
    """
    try:
        profile = read_reference_profile(str(path))
    except (ValueError, OSError) as error:
        log.warning("%s version %d: reference profile ignored, no reference gauges: %s",
                    model_name, version, first_line(error, type(error).__name__))
        return None
    if profile is None:
        log.warning("%s version %d has no reference profile (%s missing): no reference gauges",
                    model_name, version, profile_path(str(path)))
    return profile


def freeze_startup_heap() -> None:
    """Keeps everything alive now (the server's and TensorFlow's imports: 344 thousand Python objects)
    out of the garbage collector's sight for good (gc.freeze), so that no full collection walks it again.

    Call once, after TensorFlow is imported and before any model is loaded (a model's objects
    must stay collectable, for its unload). Measured under load without it: full collections of
    220-620 ms, every thread stopped, health checks included.
    """
    gc.collect()
    gc.freeze()


def _free_memory() -> None:
    """After an unload: collect the model's Python objects (its graph holds reference cycles) and
    hand the freed heap back to the OS (glibc keeps it mapped otherwise; docs/performance.md).

    Cheap, because what the imports made is frozen (`freeze_startup_heap`): a collection walks
    the loaded models' objects and what requests left, not TensorFlow's modules.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _fingerprint(path: Path) -> tuple:
    """(files, bytes, newest mtime) of a version directory: changes while it is being written."""
    count = size = 0
    newest = 0.0
    for root, _, files in os.walk(path):
        for file in files:
            try:
                stat = os.stat(os.path.join(root, file))
            except OSError:
                continue
            count, size, newest = count + 1, size + stat.st_size, max(newest, stat.st_mtime)
    return count, size, newest


