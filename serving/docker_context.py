"""The Docker build context for TF Serving: docker/ plus the newest pushed versions, with a checked config.

`prepare_context` copies the Dockerfile and configs from docker/, the newest pushed
versions under model/, and rewrites models.config so that its `stable` label and
version policy match what was copied; `digits docker context` is its command line.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import click
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

DOCKER_DIR = Path(__file__).resolve().parent.parent / "docker"
MODEL_SUBDIR = "model"  # the Dockerfile's ARG MODEL_DIR default
MODELS_CONFIG = "models.config"
MONITORING_CONFIG = "monitoring.config"
BATCHING_PARAMETERS = "batching_parameters.txt"
CONTEXT_FILES = ("Dockerfile", ".dockerignore", MODELS_CONFIG, MONITORING_CONFIG, BATCHING_PARAMETERS)
STABLE_LABEL = "stable"
IMAGE_NAME = "digits-serving"


# --- The three config files as protos ------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _mirrored_messages() -> dict:
    """MonitoringConfig and BatchingParameters, which the tensorflow-serving-api wheel does not ship.

    Field names and numbers copied from tensorflow_serving/config/monitoring_config.proto and
    tensorflow_serving/servables/tensorflow/session_bundle_config.proto (BatchingParameters as of
    TF Serving 2.16.1: fields 1-9). A private pool, so that a later import of the real modules
    cannot clash with these names.
    """
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="digits_mlops/tf_serving_configs.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED

    def add(message, name, number, kind, type_name=None, label=optional):
        message.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            message.field[-1].type_name = type_name

    prometheus = proto.message_type.add(name="PrometheusConfig")
    add(prometheus, "enable", 1, field.TYPE_BOOL)
    add(prometheus, "path", 2, field.TYPE_STRING)
    monitoring = proto.message_type.add(name="MonitoringConfig")
    add(monitoring, "prometheus_config", 1, field.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig")
    batching = proto.message_type.add(name="BatchingParameters")
    for number, name in enumerate(("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                                   "num_batch_threads"), start=1):
        add(batching, name, number, field.TYPE_MESSAGE, ".google.protobuf.Int64Value")
    add(batching, "thread_pool_name", 5, field.TYPE_MESSAGE, ".google.protobuf.StringValue")
    add(batching, "allowed_batch_sizes", 6, field.TYPE_INT64, label=repeated)
    add(batching, "pad_variable_length_inputs", 7, field.TYPE_BOOL)
    add(batching, "enable_large_batch_splitting", 8, field.TYPE_MESSAGE, ".google.protobuf.BoolValue")
    add(batching, "max_execution_batch_size", 9, field.TYPE_MESSAGE, ".google.protobuf.Int64Value")
    pool.Add(proto)

    factory = message_factory.MessageFactory(pool)
    get_class = getattr(message_factory, "GetMessageClass", factory.GetPrototype)
    return {name: get_class(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
            for name in ("MonitoringConfig", "BatchingParameters")}


def _parse(text: str, message, source: str):
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ValueError(f"{source} is not a valid {message.DESCRIPTOR.full_name}: {error}") from None


def parse_models_config(text: str, source: str = MODELS_CONFIG):
    """models.config as a tensorflow.serving.ModelServerConfig (ValueError if it does not parse)."""
    from tensorflow_serving.config import model_server_config_pb2

    return _parse(text, model_server_config_pb2.ModelServerConfig(), source)


def parse_monitoring_config(text: str, source: str = MONITORING_CONFIG):
    """monitoring.config as a tensorflow.serving.MonitoringConfig (ValueError if it does not parse)."""
    return _parse(text, _mirrored_messages()["MonitoringConfig"](), source)


def parse_batching_parameters(text: str, source: str = BATCHING_PARAMETERS):
    """batching_parameters.txt as tensorflow.serving.BatchingParameters, checked as TF Serving checks it."""
    parameters = _parse(text, _mirrored_messages()["BatchingParameters"](), source)
    sizes = list(parameters.allowed_batch_sizes)
    splitting = parameters.HasField("enable_large_batch_splitting") and parameters.enable_large_batch_splitting.value
    # As TF Serving checks it: the largest padded batch is the largest batch that can run.
    last, name = parameters.max_batch_size.value, "max_batch_size"
    if splitting and parameters.HasField("max_execution_batch_size"):
        last, name = parameters.max_execution_batch_size.value, "max_execution_batch_size"
    if sizes and (sizes != sorted(set(sizes)) or sizes[-1] != last):
        raise ValueError(f"{source}: allowed_batch_sizes {sizes} must increase and end at {name} {last}")
    return parameters


# --- Versions and the context --------------------------------------------------------------------

class ModelDir:
    """The pushed model directory: a local path, or a URI (gs://, s3://, ...) the Pusher wrote to, read
    through tf.io.gfile. A URI stays a string (Path() would make gs://b/x into gs:/b/x)."""

    def __init__(self, location: str | os.PathLike):
        from pipeline import uri

        self.location = str(location)
        self.remote = uri.is_remote(self.location)
        self._join = uri.join

    def __str__(self) -> str:
        return self.location

    def _gfile(self):
        import tensorflow as tf  # only for a URI: importing TensorFlow costs ~20 s of CPU here

        return tf.io.gfile

    def path(self, *parts: str) -> str:
        return self._join(self.location, *parts)

    def isdir(self, *parts: str) -> bool:
        return self._gfile().isdir(self.path(*parts)) if self.remote else Path(self.path(*parts)).is_dir()

    def isfile(self, *parts: str) -> bool:
        if self.remote:
            gfile = self._gfile()
            return gfile.exists(self.path(*parts)) and not gfile.isdir(self.path(*parts))
        return Path(self.path(*parts)).is_file()

    def children(self) -> list[str]:
        """The names of the subdirectories."""
        if self.remote:
            return [name.rstrip("/") for name in self._gfile().listdir(self.location) if self.isdir(name.rstrip("/"))]
        return [path.name for path in Path(self.location).iterdir() if path.is_dir()]

    def copy_tree(self, name: str, target: Path) -> None:
        """Copies the subdirectory `name` to the local directory `target`."""
        if not self.remote:
            shutil.copytree(self.path(name), target)
            return
        gfile, top = self._gfile(), self.path(name)
        for directory, _, files in gfile.walk(top):
            relative = directory[len(top):].strip("/")
            (target / relative).mkdir(parents=True, exist_ok=True)
            for file_name in files:
                gfile.copy(self._join(directory, file_name), str(target / relative / file_name), overwrite=True)


def pushed_versions(model_dir: ModelDir | str | os.PathLike) -> list[int]:
    """The version numbers under a pushed model directory (serving_model/<name>), oldest first."""
    model_dir = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    if not model_dir.isdir():
        raise ValueError(f"model directory not found: {model_dir}")
    if model_dir.isfile("saved_model.pb"):
        raise ValueError(f"{model_dir} is one version (it holds saved_model.pb); pass its parent, the model "
                         "directory that holds the numbered versions")
    numbered = sorted((name for name in model_dir.children() if name.isdigit()), key=int)
    incomplete = [name for name in numbered if not model_dir.isfile(name, "saved_model.pb")]
    if incomplete:
        raise ValueError(f"not a version dir (no saved_model.pb): {', '.join(incomplete)} in {model_dir}")
    if not numbered:
        raise ValueError(f"no model versions (numbered directories with a saved_model.pb) in {model_dir}")
    return [int(name) for name in numbered]


def _with_versions(config, num_versions: int, stable: int):
    """models.config keeping the newest `num_versions` loaded and labelling `stable`."""
    models = list(config.model_config_list.config)
    if len(models) != 1:
        raise ValueError(f"{MODELS_CONFIG} must configure exactly one model, found {len(models)}")
    model = models[0]
    # Every copied version loads; with fewer pushed than asked, a version added later (bind mount) loads too.
    model.model_version_policy.latest.num_versions = num_versions
    model.version_labels.clear()
    model.version_labels[STABLE_LABEL] = stable
    return config


def prepare_context(model_dir: str | os.PathLike, out: Path, stable: int | None = None, versions: int = 2) -> Path:
    """Writes a ready-to-`docker build` directory at `out` and returns it.

    The newest `versions` versions of `model_dir` (a path, or a URI such as gs://bucket/serving/digits,
    where the Pusher of a Vertex run writes) go to out/model/<version>; models.config
    keeps the newest `versions` loaded and labels `stable` (default: the newest) "stable". An existing
    `out` is replaced only if it is empty or an earlier context. ValueError on bad input.
    """
    model_dir, out = ModelDir(model_dir), Path(out)
    if versions < 1:
        raise ValueError(f"versions must be at least 1, got {versions}")
    copied = pushed_versions(model_dir)[-versions:]
    stable = copied[-1] if stable is None else stable
    if stable not in copied:
        raise ValueError(f"stable version {stable} is not among the copied versions "
                         f"{', '.join(map(str, copied))} (the newest {versions} in {model_dir})")
    missing = [name for name in CONTEXT_FILES if not (DOCKER_DIR / name).is_file()]
    if missing:
        raise ValueError(f"missing in {DOCKER_DIR}: {', '.join(missing)}")
    if out.exists() and not _replaceable(out):
        raise ValueError(f"{out} exists and is not an earlier docker context; choose a new or empty directory")

    config = _with_versions(parse_models_config((DOCKER_DIR / MODELS_CONFIG).read_text()), versions, stable)
    parse_monitoring_config((DOCKER_DIR / MONITORING_CONFIG).read_text())
    parse_batching_parameters((DOCKER_DIR / BATCHING_PARAMETERS).read_text())

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in CONTEXT_FILES:
            if name != MODELS_CONFIG:
                shutil.copyfile(DOCKER_DIR / name, staging / name)
        (staging / MODELS_CONFIG).write_text(
            f"# Written by `digits docker context` from docker/{MODELS_CONFIG} for versions "
            f"{', '.join(map(str, copied))}.\n" + text_format.MessageToString(config))
        for version in copied:
            model_dir.copy_tree(str(version), staging / MODEL_SUBDIR / str(version))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replaceable(out: Path) -> bool:
    if not out.is_dir():
        return False
    return not any(out.iterdir()) or all((out / name).exists() for name in ("Dockerfile", MODELS_CONFIG, MODEL_SUBDIR))


def stable_version(context: Path) -> int:
    """The version the `stable` label names in a context's models.config."""
    config = parse_models_config((Path(context) / MODELS_CONFIG).read_text())
    return config.model_config_list.config[0].version_labels[STABLE_LABEL]


# --- `digits docker ...` -------------------------------------------------------------------------

@click.group("docker")
def docker_group():
    """Build inputs for the TF Serving image."""


@docker_group.command("context")
@click.option("--model-dir", default="serving_model/digits", show_default=True,
              help="Pushed model directory holding numbered versions: a path, or a URI (gs://bucket/serving/digits).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("build/docker"), show_default=True,
              help="Directory to write the build context to (replaced if it is an earlier context).")
@click.option("--stable", type=int, default=None, help="Version to label `stable` [default: the newest].")
@click.option("--versions", type=int, default=2, show_default=True, help="How many of the newest versions to copy.")
def context_command(model_dir: str, out: Path, stable: int | None, versions: int):
    """Assemble a `docker build` context: Dockerfile, configs and the newest model versions."""
    try:
        context = prepare_context(model_dir, out, stable=stable, versions=versions)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    except Exception as error:  # tf.io.gfile's errors on a URI: no credentials, no such bucket
        reason = (str(error).strip().splitlines() or [""])[0]
        raise click.ClickException(f"cannot read {model_dir}: {type(error).__name__}: {reason}") from None
    copied = sorted(int(path.name) for path in (context / MODEL_SUBDIR).iterdir())
    label = stable_version(context)
    tag = f"{IMAGE_NAME}:{label}"
    click.echo(f"Context in {context}: versions {', '.join(map(str, copied))}, stable = {label}")
    click.echo("Next:")
    click.echo(f"  docker build -t {tag} {context}")
    click.echo(f"  docker run --rm -p 8500:8500 -p 8501:8501 {tag}")
