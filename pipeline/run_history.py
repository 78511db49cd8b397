"""What MLMD knows about pipeline runs: which component ran, how it ended, how long it took.

The one place that reads executions back from the sqlite metadata store; the live
progress display polls it, and the run report reads the finished run from it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

FINISHED_STATES = ("COMPLETE", "CACHED", "FAILED", "CANCELED")


@dataclass(frozen=True)
class ComponentRun:
    node_id: str
    state: str  # RUNNING, COMPLETE, CACHED, FAILED, ...
    started_ms: int
    updated_ms: int

    @property
    def seconds(self) -> float:
        return (self.updated_ms - self.started_ms) / 1000.0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


def open_store(metadata_path: Path):
    """A read/write handle on the sqlite MLMD store at `metadata_path`."""
    from ml_metadata.metadata_store import metadata_store
    from tfx.orchestration import metadata

    return metadata_store.MetadataStore(metadata.sqlite_metadata_connection_config(str(metadata_path)))


def latest_run(metadata_path: Path, pipeline_name: str, since_ms: int = 0) -> list[ComponentRun]:
    """Executions of the newest run of `pipeline_name` started at or after `since_ms`, in start order."""
    if not Path(metadata_path).exists():
        return []
    store = open_store(metadata_path)
    run = _latest_run_context(store, pipeline_name, since_ms)
    return [] if run is None else _components(_executions_by_node(store, run, pipeline_name))


def latest_run_outputs(metadata_path: Path, pipeline_name: str) -> tuple[list[ComponentRun], dict[str, dict]]:
    """The newest run's components, and per component of that run its output artifacts by key (TFX
    artifacts, as a component's executor gets them).

    Only that run's executions count (a cached one points at the artifacts it reused), so a
    component that did not run in it has no outputs here, whatever earlier runs made.
    """
    from tfx.types import artifact_utils

    if not Path(metadata_path).exists():
        return [], {}
    store = open_store(metadata_path)
    run = _latest_run_context(store, pipeline_name, 0)
    if run is None:
        return [], {}
    executions = _executions_by_node(store, run, pipeline_name)
    outputs: dict[str, dict] = {}
    for node_id, execution in executions.items():
        events = [event for event in store.get_events_by_execution_ids([execution.id])
                  if event.type in (event.OUTPUT, event.DECLARED_OUTPUT)]
        artifacts = {a.id: a for a in store.get_artifacts_by_id([event.artifact_id for event in events])}
        types = {t.id: t for t in store.get_artifact_types_by_id(list({a.type_id for a in artifacts.values()}))}
        for event in events:
            key = event.path.steps[0].key if event.path.steps else "output"
            found = artifacts[event.artifact_id]
            outputs.setdefault(node_id, {})[key] = artifact_utils.deserialize_artifact(types[found.type_id], found)
    return _components(executions), outputs


def latest_run_properties(metadata_path: Path, pipeline_name: str, node_id: str) -> dict[str, object]:
    """What one component of the newest run was configured with (its TFX exec properties), or {}."""
    if not Path(metadata_path).exists():
        return {}
    store = open_store(metadata_path)
    run = _latest_run_context(store, pipeline_name, 0)
    execution = _executions_by_node(store, run, pipeline_name).get(node_id) if run is not None else None
    if execution is None:
        return {}
    properties = {**execution.properties, **execution.custom_properties}
    return {name: getattr(value, value.WhichOneof("value")) for name, value in properties.items()
            if value.WhichOneof("value") is not None}


def _latest_run_context(store, pipeline_name: str, since_ms: int):
    runs = [
        context for context in store.get_contexts_by_type("pipeline_run")
        if context.create_time_since_epoch >= since_ms and _belongs_to(store, context, pipeline_name)
    ]
    return max(runs, key=lambda context: context.create_time_since_epoch) if runs else None


def _executions_by_node(store, run_context, pipeline_name: str) -> dict:
    """{node id: its execution in this run} (the newest, should a node have several)."""
    in_run = {execution.id: execution for execution in store.get_executions_by_context(run_context.id)}
    by_node = {}
    prefix = f"{pipeline_name}."
    for node in store.get_contexts_by_type("node"):
        if node.name.startswith(prefix):
            for execution in store.get_executions_by_context(node.id):
                if execution.id in in_run:
                    node_id = node.name[len(prefix):]
                    if node_id not in by_node or execution.id > by_node[node_id].id:
                        by_node[node_id] = execution
    return by_node


def _components(executions: dict) -> list[ComponentRun]:
    from ml_metadata.proto import metadata_store_pb2

    result = [
        ComponentRun(
            node_id=node_id,
            state=metadata_store_pb2.Execution.State.Name(execution.last_known_state),
            started_ms=execution.create_time_since_epoch,
            updated_ms=execution.last_update_time_since_epoch,
        )
        for node_id, execution in executions.items()
    ]
    return sorted(result, key=lambda component: (component.started_ms, component.node_id))


def _belongs_to(store, run_context, pipeline_name: str) -> bool:
    parents = store.get_parent_contexts_by_context(run_context.id)
    return any(parent.name == pipeline_name for parent in parents) if parents else True


class ProgressWatcher:
    """Polls MLMD in a thread and reports components as they start and finish."""

    def __init__(self, metadata_path: Path, pipeline_name: str, since_ms: int,
                 on_event: Callable[[str, ComponentRun], None], interval: float = 0.5):
        self._args = (metadata_path, pipeline_name, since_ms)
        self._on_event = on_event
        self._interval = interval
        self._seen: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipeline-progress", daemon=True)

    def __enter__(self) -> "ProgressWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # whatever finished since the last poll

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # the database may be mid-write; the next poll will see it
                continue

    def poll(self) -> None:
        for component in latest_run(*self._args):
            previous = self._seen.get(component.node_id)
            if previous is None and not component.finished:
                self._on_event("running", component)
            if component.finished and previous not in FINISHED_STATES:
                self._on_event("finished", component)
            self._seen[component.node_id] = component.state
