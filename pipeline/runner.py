"""Runs the pipeline with TFX's LocalDagRunner: prepares inputs, shows progress, returns the run.

Preparation makes the TFX cache trustworthy. The cache keys on the schema file's
path and on the dotted names of preprocessing_fn/run_fn, not on their contents,
so the curated schema is copied to a path named after its hash, and a hash of
the code that Transform and the Trainer run goes into their custom_config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from pipeline import uri
from pipeline.config import PipelineConfig
from pipeline.run_history import ComponentRun, ProgressWatcher, latest_run
from tfrecord_builder.builder import process_alive

REPO_PACKAGES = Path(__file__).resolve().parent.parent
# The code whose behaviour Transform and Trainer outputs depend on: packages, and single modules
# they import from elsewhere (the reference profile's confidence buckets come from monitoring).
FINGERPRINTED = ("components", "data", "monitoring/names.py")


def code_fingerprint() -> str:
    digest = hashlib.sha256()
    for entry in FINGERPRINTED:
        root = REPO_PACKAGES / entry
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(path.relative_to(REPO_PACKAGES).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def content_addressed_schema(config: PipelineConfig) -> str:
    """The curated schema copied to PIPELINE_ROOT/_schema/<sha256>/schema.pbtxt (local or remote),
    written under a temporary name and renamed, so a reader never sees half a file."""
    from tfx.dsl.io import fileio

    if not fileio.exists(config.schema_file):
        raise ValueError(f"schema file {config.schema_file} does not exist")
    with fileio.open(config.schema_file, "rb") as source:
        data = source.read()
    directory = uri.join(config.pipeline_root, "_schema", hashlib.sha256(data).hexdigest()[:16])
    target = uri.join(directory, "schema.pbtxt")
    if not fileio.exists(target):
        fileio.makedirs(directory)
        partial = uri.join(directory, f".schema.pbtxt.{os.getpid()}.tmp")
        with fileio.open(partial, "wb") as sink:
            sink.write(data)
        fileio.rename(partial, target, overwrite=True)
    return target


def prepare(config: PipelineConfig) -> PipelineConfig:
    """What the pipeline is built from: the schema by content, the code's fingerprint, the base
    weights and the training precision decided (all part of the components' cache keys)."""
    from tfx.dsl.io import fileio

    from components import precision
    from components.base_weights import pin

    if config.local_dir is None:
        raise ValueError(f"the local runner keeps its metadata in a local sqlite file: with the pipeline "
                         f"root {config.pipeline_root}, give it a local directory (--local-root)")
    config.local_dir.mkdir(parents=True, exist_ok=True)
    fileio.makedirs(config.pipeline_root)
    return dataclasses.replace(config, schema_file=content_addressed_schema(config),
                               code_fingerprint=code_fingerprint(), trainer=precision.pin(pin(config.trainer)))


SCRATCH = "_scratch"


@contextlib.contextmanager
def run_scratch(local_dir: Path) -> Iterator[Path]:
    """The run's temporary files under <local_dir>/_scratch/<pid>/, removed when the run ends.

    Components leave files in the temporary directory that nobody removes: TFX builds a 45 MB
    sdist of itself for every Beam component (tfx/utils/dependency_utils.py), Beam stages it, and
    AutoGraph writes a module per traced function. Left in /tmp that was about 200 MB per run and
    9 GB per test suite. A run killed before it could clean up leaves its directory; the next run
    on the same local directory removes it once its process is gone.
    """
    root = local_dir / SCRATCH
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():
        if not (stale.name.isdigit() and process_alive(int(stale.name))):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = root / str(os.getpid())
    scratch.mkdir(exist_ok=True)
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(scratch)
    os.environ["TMPDIR"] = str(scratch)  # Beam's worker processes, pip, setup.py
    try:
        yield scratch
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def no_tfx_sdist_for_local_workers(beam_args: tuple[str, ...]) -> Iterator[None]:
    """Stops TFX building an sdist of itself for each Beam component when the workers are this
    interpreter (pipeline.beam.workers_are_this_interpreter).

    TFX's Beam executors call `dependency_utils.make_beam_dependency_flags`, which builds and adds a
    45 MB `tfx_ephemeral` sdist (about 1 s) unless a Beam option says how workers get TFX: right for
    a remote cluster without the pipeline image, a waste when the worker is this process, and the
    portable runner then stages it too. Beam's own options have no honest way to say "the workers
    are here", so the function is replaced, for this run only, by one that leaves the arguments as
    they are. Remote runners keep TFX's behaviour.
    """
    from pipeline import beam

    if not beam.workers_are_this_interpreter(beam_args):
        yield
        return
    from tfx.utils import dependency_utils

    original = dependency_utils.make_beam_dependency_flags
    dependency_utils.make_beam_dependency_flags = list
    try:
        yield
    finally:
        dependency_utils.make_beam_dependency_flags = original


def run_pipeline(config: PipelineConfig,
                 on_event: Callable[[str, ComponentRun], None] = lambda event, component: None
                 ) -> list[ComponentRun]:
    """Runs the whole pipeline; raises what the failing component raised."""
    from tfx import v1 as tfx

    from pipeline.pipeline import create_pipeline

    config = prepare(config)
    started_ms = int(time.time() * 1000)
    with run_scratch(config.local_dir), no_tfx_sdist_for_local_workers(config.beam_pipeline_args), \
            ProgressWatcher(config.metadata_path, config.pipeline_name, started_ms, on_event):
        tfx.orchestration.LocalDagRunner().run(create_pipeline(config))
    return latest_run(config.metadata_path, config.pipeline_name, started_ms)
