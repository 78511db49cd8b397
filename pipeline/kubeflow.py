"""The same pipeline compiled for Vertex AI Pipelines: a PipelineJob JSON (not for Kubeflow Pipelines:
docs/scale-out.md says why).

TFX's KubeflowV2DagRunner turns `create_pipeline(config)` into the PipelineJob that Vertex AI
runs: one container per component, all from the pipeline image (docker/pipeline/Dockerfile),
which has this project installed, so the dotted `preprocessing_fn` / `run_fn` and the custom
executors import there. Compiling is offline: the functions are named by dotted path, so TFX
builds no `module_file` wheel, and nothing here reads the pipeline root.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline import uri
from pipeline.config import PipelineConfig

# Where the pipeline image installs the project (a virtual environment, see
# docker/pipeline/Dockerfile): the curated schema is package data there.
IMAGE_VENV = "/opt/venv"
IMAGE_SCHEMA_FILE = f"{IMAGE_VENV}/lib/python3.10/site-packages/pipeline/schema/schema.pbtxt"
TRAINER_ID = "Trainer"
# Vertex AI Pipelines' accelerator names (machine types are chosen from cpu, memory and these).
GPU_TYPES = ("NVIDIA_TESLA_T4", "NVIDIA_L4", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P100", "NVIDIA_TESLA_A100",
             "NVIDIA_A100_80GB", "NVIDIA_H100_80GB")


class CompileError(ValueError):
    """A pipeline that cannot be compiled for an orchestrator as configured; one line."""


@dataclass(frozen=True)
class Resources:
    """What one component's container asks for (Vertex AI picks a machine that has it)."""

    cpu: float | None = None  # vCPUs
    memory_gb: float | None = None
    gpu_type: str | None = None
    gpu_count: int = 0

    def __post_init__(self) -> None:
        if self.cpu is not None and self.cpu <= 0:
            raise CompileError(f"CPU must be positive, got {self.cpu}")
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise CompileError(f"memory must be positive, got {self.memory_gb} GB")
        if self.gpu_type is not None and self.gpu_type not in GPU_TYPES:
            raise CompileError(f"unknown GPU type {self.gpu_type!r}; Vertex AI's are {', '.join(GPU_TYPES)}")
        if (self.gpu_type is None) != (self.gpu_count == 0):
            raise CompileError("a GPU needs both a type and a count (TYPE or TYPE:COUNT)")

    @classmethod
    def parse_gpu(cls, text: str | None) -> tuple[str | None, int]:
        """'NVIDIA_L4' or 'NVIDIA_L4:2' -> (type, count)."""
        if not text:
            return None, 0
        match = re.fullmatch(r"([A-Z0-9_]+)(?::([1-9][0-9]?))?", text)
        if not match:
            raise CompileError(f"--trainer-gpu wants TYPE or TYPE:COUNT (e.g. NVIDIA_L4:1), got {text!r}")
        return match.group(1), int(match.group(2) or 1)

    def to_proto(self):
        """TFX's platform config for the Vertex / Kubeflow V2 compiler: a ResourceSpec."""
        from kfp.pipeline_spec import pipeline_spec_pb2

        spec = pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec()
        if self.cpu is not None:
            spec.cpu_limit = self.cpu
        if self.memory_gb is not None:
            spec.memory_limit = self.memory_gb
        if self.gpu_type is not None:
            spec.accelerator.type = self.gpu_type
            spec.accelerator.count = self.gpu_count
        return spec

    @property
    def empty(self) -> bool:
        return self.cpu is None and self.memory_gb is None and self.gpu_type is None


def require_runner():
    """TFX 1.16's KubeflowV2DagRunner, or a clear error: without `kfp-pipeline-spec`, TFX swallows
    the ImportError and the runner is simply missing from tfx.orchestration.experimental."""
    try:
        from kfp.pipeline_spec import pipeline_spec_pb2  # noqa: F401
    except ImportError as error:
        raise CompileError(
            "compiling for Vertex AI / Kubeflow needs the package kfp-pipeline-spec==0.2.2 (the last release "
            f"on protobuf 3), which is missing ({error}); `bash .ci/tasks.sh setup` installs it") from None
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner

    return kubeflow_v2_dag_runner


def container_config(config: PipelineConfig) -> PipelineConfig:
    """The configuration as the containers see it: every location a URI they can reach, the schema
    where the image installs it, the code fingerprint of what the image is built from."""
    from pipeline.runner import code_fingerprint

    options = {"data_root": "--data", "pipeline_root": "--pipeline-root", "serving_dir": "--serving-dir"}
    local = [option for name, option in options.items() if not uri.is_remote(getattr(config, name))]
    if local:
        raise CompileError(f"the containers cannot see this machine's files: give {', '.join(local)} as a URI "
                           "(gs://bucket/... for Vertex AI)")
    elsewhere = [f"{option} {getattr(config, name)}" for name, option in options.items()
                 if not str(getattr(config, name)).startswith("gs://")]
    if elsewhere:
        raise CompileError(f"Vertex AI Pipelines keeps artifacts in Cloud Storage and its containers read gs:// "
                           f"with their service account: give gs://bucket/... for {', '.join(elsewhere)}")
    if config.trainer.base_weights not in ("imagenet", "none"):
        raise CompileError(f"--base-weights {config.trainer.base_weights!r} names nothing the container has: "
                           "use imagenet (downloaded by the Trainer) or none")
    return dataclasses.replace(config, schema_file=IMAGE_SCHEMA_FILE, code_fingerprint=code_fingerprint())


def trainer_image(image: str, resources: Resources, explicit: str | None = None) -> str:
    """The Trainer's image: the pipeline image, or with a GPU its CUDA `gpu` target (REPO:TAG-gpu, or
    `explicit`). A GPU on the CPU image would sit idle while the bill runs: refused."""
    from pipeline import images

    if resources.gpu_type is None:
        if explicit is not None and explicit != image:
            raise CompileError("--trainer-image is for a GPU Trainer: add --trainer-gpu, or leave it out")
        return image
    try:
        chosen = explicit or images.variant(image, images.GPU_SUFFIX, "--trainer-image")
    except images.ImageError as error:
        raise CompileError(str(error)) from None
    if chosen == image:
        raise CompileError(f"--trainer-gpu on {image}, the CPU image (tensorflow without CUDA): the GPU would sit "
                           f"idle; build the gpu target (docker build --target gpu -t IMAGE{images.GPU_SUFFIX}) and "
                           "give it with --trainer-image, or leave --trainer-image out to use that tag")
    return chosen


def compile_pipeline(config: PipelineConfig, image: str, output: Path, trainer_resources: Resources = Resources(),
                     display_name: str | None = None, trainer_image_name: str | None = None) -> dict:
    """Writes the PipelineJob JSON to `output` and returns it."""
    runner_module = require_runner()
    from pipeline.pipeline import create_pipeline
    from tfx.orchestration.kubeflow.v2 import pipeline_builder

    for name, value in (("--image", image), ("--trainer-image", trainer_image_name)):
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise CompileError(f"{name} must name a container image, got {value!r}")
    trainer = trainer_image(image, trainer_resources, trainer_image_name)
    pipeline = create_pipeline(container_config(config))
    if not trainer_resources.empty:
        component = next(c for c in pipeline.components if c.id == TRAINER_ID)
        component.with_platform_config(trainer_resources.to_proto())
    # One image for every step, the Trainer's own when it differs (TFX's per-component image map).
    images = image if trainer == image else {pipeline_builder.DEFAULT_IMAGE_PATH_KEY: image, TRAINER_ID: trainer}
    runner = runner_module.KubeflowV2DagRunner(
        config=runner_module.KubeflowV2DagRunnerConfig(default_image=images, display_name=display_name))
    job = runner.run(pipeline, write_out=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.tmp")
    partial.write_text(json.dumps(job, indent=2, sort_keys=True) + "\n")
    partial.replace(output)
    return job


def trainer_image_of(job: dict) -> str:
    """The image the compiled Trainer step runs."""
    spec = job["pipelineSpec"]
    component = spec["root"]["dag"]["tasks"][TRAINER_ID]["componentRef"]["name"]
    return spec["deploymentSpec"]["executors"][spec["components"][component]["executorLabel"]]["container"]["image"]
