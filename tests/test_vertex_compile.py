"""`digits pipeline compile --target vertex`: the pipeline-spec JSON Vertex AI Pipelines runs.

Compiled once, offline, through the real command line; then read as a platform engineer would
before submitting it. The golden file is kept as TFX's own runner tests keep theirs: normalised
(TFX's version labels and the code fingerprint, which changes with any code change, taken out).
Regenerate it with DIGITS_UPDATE_GOLDEN=1 after a deliberate change, and read the diff.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_pipeline_image import installed_project  # noqa: F401 (a fixture: the project as the image installs it)

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "testdata" / "vertex_pipeline.json"
IMAGE = "europe-west4-docker.pkg.dev/my-project/digits/digits-pipeline:0.1.0"
ROOT, DATA, SERVING = "gs://my-bucket/pipeline_root", "gs://my-bucket/tfrecords", "gs://my-bucket/serving"
BEAM_ARGS = ["--project=my-project", "--region=europe-west4", "--temp_location=gs://my-bucket/tmp"]
COMPONENTS = {"ImportExampleGen", "StatisticsGen", "ImportSchemaGen", "ExampleValidator", "AnomaliesGate",
              "Transform", "Trainer", "Evaluator", "Pusher", "RunReport",
              "latest_blessed_model_resolver-model-resolver",
              "latest_blessed_model_resolver-model-blessing-resolver"}
BEAM_COMPONENTS = {"ImportExampleGen", "StatisticsGen", "Transform", "Evaluator"}


def compile_args(output: Path, *extra: str) -> list[str]:
    return ["pipeline", "compile", "--target", "vertex", "--image", IMAGE, "--pipeline-root", ROOT, "--data", DATA,
            "--serving-dir", SERVING, "--train-examples", "3600", "--output", str(output),
            "--beam-profile", "dataflow", *(f"--beam-arg={arg}" for arg in BEAM_ARGS), *extra]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    from click.testing import CliRunner

    from digits.cli import cli

    output = tmp_path_factory.mktemp("vertex") / "pipeline.json"
    result = CliRunner().invoke(cli, compile_args(output, "--trainer-cpu", "8", "--trainer-memory", "32",
                                                  "--trainer-gpu", "NVIDIA_L4:1"))
    assert result.exit_code == 0, result.output
    assert "12 steps" in result.output
    return json.loads(output.read_text())


def tasks(job: dict) -> dict:
    return job["pipelineSpec"]["root"]["dag"]["tasks"]


def executors(job: dict) -> dict:
    return job["pipelineSpec"]["deploymentSpec"]["executors"]


def containers(job: dict) -> dict[str, dict]:
    """Task name -> its container spec (resolvers and importers run inside Vertex, without one)."""
    specs = {}
    for name, task in tasks(job).items():
        executor = job["pipelineSpec"]["components"][task["componentRef"]["name"]].get("executorLabel")
        if executor and "container" in executors(job)[executor]:
            specs[name] = executors(job)[executor]["container"]
    return specs


def test_every_component_and_both_resolver_steps_are_there(compiled):
    assert set(tasks(compiled)) == COMPONENTS


def test_dependencies_follow_the_pipeline(compiled):
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks(compiled).items()}
    assert depends["StatisticsGen"] == {"ImportExampleGen"}
    assert depends["ExampleValidator"] == {"StatisticsGen", "ImportSchemaGen"}
    assert depends["AnomaliesGate"] == {"ExampleValidator"}
    assert "AnomaliesGate" in depends["Transform"]  # bad data stops before Transform and training
    assert {"Transform", "ImportExampleGen"} <= depends["Trainer"]
    assert {"Trainer", "latest_blessed_model_resolver-model-resolver"} <= depends["Evaluator"]
    assert {"Evaluator", "Trainer"} <= depends["Pusher"]
    assert "Pusher" in depends["RunReport"]  # the report is the run's last step
    # and it is a DAG: an order exists in which every task comes after what it depends on
    done: set[str] = set()
    while len(done) < len(depends):
        ready = {name for name, needs in depends.items() if name not in done and needs <= done}
        assert ready, f"a cycle among {set(depends) - done}"
        done |= ready


def test_every_container_runs_the_given_image_and_tfxs_executor_entry_point(compiled):
    specs = containers(compiled)
    assert set(specs) == COMPONENTS - {"latest_blessed_model_resolver-model-resolver",
                                       "latest_blessed_model_resolver-model-blessing-resolver"}
    for name, spec in specs.items():
        # The GPU Trainer runs the image's CUDA target (docker build --target gpu -t IMAGE-gpu).
        assert spec["image"] == (f"{IMAGE}-gpu" if name == "Trainer" else IMAGE), name
        assert spec["command"] == ["python", "-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]


def executor_class(spec: dict) -> str:
    args = spec["args"]
    return args[args.index("--executor_class_path") + 1]


def parameter(job: dict, task: str, name: str):
    value = tasks(job)[task]["inputs"]["parameters"][name]["runtimeValue"]["constantValue"]
    return next(iter(value.values()))


# What the containers must be able to import from the installed project (tests/test_pipeline_image.py
# imports them from an installed copy, outside the repository).
CONTAINER_IMPORTS = {"AnomaliesGate": "pipeline.anomalies_gate.AnomaliesGate_Executor",
                     "Pusher": "pipeline.pusher.DeduplicatingPusherExecutor",
                     "RunReport": "pipeline.report_component.RunReport_Executor",
                     # TFX's entry point imports a custom artifact type by its name, before the executor
                     "HtmlReport": "pipeline.HtmlReport",
                     "preprocessing_fn": "components.transform.preprocessing_fn",
                     "run_fn": "components.trainer.run_fn"}


def test_the_custom_executors_and_dotted_functions_are_named_for_the_container(compiled):
    specs = containers(compiled)
    assert executor_class(specs["AnomaliesGate"]) == CONTAINER_IMPORTS["AnomaliesGate"]
    assert executor_class(specs["Pusher"]) == CONTAINER_IMPORTS["Pusher"]
    assert executor_class(specs["RunReport"]) == CONTAINER_IMPORTS["RunReport"]
    assert parameter(compiled, "Transform", "preprocessing_fn") == CONTAINER_IMPORTS["preprocessing_fn"]
    assert parameter(compiled, "Trainer", "run_fn") == CONTAINER_IMPORTS["run_fn"]


def test_the_run_report_step_reads_each_artifact_from_the_step_that_makes_it(compiled):
    """The report is an artifact of every Vertex run: its inputs are the run's own outputs, wired by role,
    and its page goes into an output artifact of the type the container can import."""
    import yaml

    from pipeline.report import ROLES

    task = tasks(compiled)["RunReport"]
    wired = {role: (spec["taskOutputArtifact"]["producerTask"], spec["taskOutputArtifact"]["outputArtifactKey"])
             for role, spec in task["inputs"]["artifacts"].items()}
    assert wired == ROLES
    assert parameter(compiled, "RunReport", "data_root") == DATA  # the build's manifest names people's corrections
    assert parameter(compiled, "RunReport", "pipeline_name") == "digits"
    component = compiled["pipelineSpec"]["components"][task["componentRef"]["name"]]
    [(key, output)] = component["outputDefinitions"]["artifacts"].items()
    assert key == "report"
    assert yaml.safe_load(output["artifactType"]["instanceSchema"])["title"] == CONTAINER_IMPORTS["HtmlReport"]


def test_what_the_containers_import_imports_from_an_installed_copy_outside_the_repository(installed_project,
                                                                                       tmp_path):
    """Really imported (TensorFlow, TFX and all), in a process that sees only the installed copy and
    the environment's third-party packages: what the pipeline image's containers do."""
    import subprocess

    probe = ("import importlib, json\n"
             "found = {}\n"
             f"for dotted in {sorted(CONTAINER_IMPORTS.values())!r}:\n"
             "    module, name = dotted.rsplit('.', 1)\n"
             "    loaded = importlib.import_module(module)\n"
             "    found[dotted] = [loaded.__file__, callable(getattr(loaded, name))]\n"
             "print(json.dumps(found))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(installed_project), "PYTHONNOUSERSITE": "1",
           "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(found) == set(CONTAINER_IMPORTS.values())
    for dotted, (origin, is_callable) in found.items():
        assert origin.startswith(str(installed_project)), (dotted, origin)
        assert is_callable, dotted


def test_beam_arguments_reach_the_beam_components(compiled):
    specs = containers(compiled)
    for name in BEAM_COMPONENTS:
        args = specs[name]["args"]
        assert "--runner=DataflowRunner" in args and f"--sdk_container_image={IMAGE}-dataflow" in args, name
        assert "--machine_type=n2-standard-4" in args and "--max_num_workers=10" in args, name
        assert all(arg in args for arg in BEAM_ARGS), name


def test_only_the_trainer_asks_for_a_gpu_and_more_memory(compiled):
    specs = containers(compiled)
    assert specs["Trainer"]["resources"] == {"cpuLimit": 8.0, "memoryLimit": 32.0,
                                             "accelerator": {"type": "NVIDIA_L4", "count": "1"}}
    assert all("resources" not in spec for name, spec in specs.items() if name != "Trainer")


def test_the_pipeline_root_and_the_locations_are_the_given_uris(compiled):
    assert compiled["runtimeConfig"]["gcsOutputDirectory"] == ROOT
    assert parameter(compiled, "ImportExampleGen", "input_base") == DATA
    assert push_directory(parameter(compiled, "Pusher", "push_destination")) == f"{SERVING}/digits"


def push_directory(push_destination_json: str) -> str:
    from google.protobuf import json_format
    from tfx.proto import pusher_pb2

    return json_format.Parse(push_destination_json, pusher_pb2.PushDestination()).filesystem.base_directory


@pytest.mark.parametrize("option, location", [
    ("--pipeline-root", "s3://kfp-artifacts/digits"), ("--data", "s3://datasets/digits/tfrecords"),
    ("--serving-dir", "minio://models/serving"),
])
def test_vertex_takes_cloud_storage_only(tmp_path, option, location):
    """Vertex AI keeps artifacts in Cloud Storage; an S3 or MinIO location (Kubeflow Pipelines on a
    cluster of one's own, which this file is not for) is refused in one line, and nothing is written."""
    from click.testing import CliRunner

    from digits.cli import cli

    args = {"--pipeline-root": ROOT, "--data": DATA, "--serving-dir": SERVING, option: location}
    output = tmp_path / "pipeline.json"
    locations = [word for pair in args.items() for word in pair]
    result = CliRunner().invoke(cli, ["pipeline", "compile", "--image", IMAGE, *locations, "--train-examples", "3600",
                                      "--output", str(output)])
    assert result.exit_code == 1, result.output
    assert f"give gs://bucket/... for {option} {location}" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not output.exists()


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_no_path_of_the_build_machine_appears_anywhere(compiled):
    from pipeline.kubeflow import IMAGE_SCHEMA_FILE

    text = json.dumps(compiled)
    for local in {str(REPO), str(Path.home()), os.getcwd(), sys.prefix, "/tmp/"}:
        assert local not in text, local
    # The one absolute path is the schema inside the image (docker/pipeline/Dockerfile installs it there).
    import re

    paths = {match for string in _strings(compiled) for match in re.findall(r"(?<![\w:/])/[\w.-]+(?:/[\w.-]+)+", string)}
    assert paths == {IMAGE_SCHEMA_FILE}, paths


def test_the_vertex_ai_sdk_accepts_the_compiled_file(compiled, tmp_path):
    """google-cloud-aiplatform builds its PipelineJob request from the file, offline (anonymous
    credentials, nothing is sent): what `aiplatform.PipelineJob(...).submit()` would send."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    template = tmp_path / "pipeline.json"
    template.write_text(json.dumps(compiled))
    job = aiplatform.PipelineJob(display_name="digits", template_path=str(template), project="my-project",
                                 location="europe-west4", credentials=AnonymousCredentials(), enable_caching=True)
    request = job._gca_resource
    assert request.runtime_config.gcs_output_directory == ROOT
    assert set(request.pipeline_spec["root"]["dag"]["tasks"]) == COMPONENTS


def normalised(job: dict) -> dict:
    """What changes with TFX's version or any code edit, replaced by placeholders."""
    from pipeline.runner import code_fingerprint

    job = json.loads(json.dumps(job).replace(code_fingerprint(), "<code fingerprint>"))
    job.pop("labels", None)
    job["pipelineSpec"].pop("sdkVersion", None)
    return job


def test_the_compiled_pipeline_matches_the_golden_file(compiled):
    got = normalised(compiled)
    if os.environ.get("DIGITS_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert GOLDEN.is_file(), "no golden file yet: run with DIGITS_UPDATE_GOLDEN=1"
    assert got == json.loads(GOLDEN.read_text()), (
        "the compiled pipeline changed: if that is intended, regenerate with "
        "DIGITS_UPDATE_GOLDEN=1 pytest tests/test_vertex_compile.py and review the diff")


@pytest.mark.parametrize("extra, words", [
    (["--data", "/srv/tfrecords"], ["--data", "URI"]),
    (["--pipeline-root", "pipeline_root"], ["--pipeline-root", "URI"]),
    (["--trainer-gpu", "NVIDIA_L4:x"], ["TYPE:COUNT"]),
    (["--trainer-gpu", "GTX_1080"], ["unknown GPU type"]),
    (["--trainer-memory", "-1"], ["memory must be positive"]),
    (["--trainer-gpu", "NVIDIA_L4", "--trainer-image", IMAGE], ["the CPU image", "--target gpu", "sit idle"]),
    (["--trainer-image", f"{IMAGE}-gpu"], ["--trainer-image is for a GPU Trainer"]),
    (["--trainer-gpu", "NVIDIA_L4", "--image", f"{IMAGE.rsplit(':', 1)[0]}@sha256:{'a' * 64}",
      f"--beam-arg=--sdk_container_image={IMAGE}-dataflow"], ["cannot derive the gpu variant", "--trainer-image"]),
])
def test_bad_compile_options_are_one_line_errors(tmp_path, extra, words):
    from click.testing import CliRunner

    from digits.cli import cli

    result = CliRunner().invoke(cli, compile_args(tmp_path / "p.json", *extra))
    assert result.exit_code == 1, result.output
    assert all(word in result.output for word in words), result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("extra, trainer", [
    ([], IMAGE),  # no GPU: every step on the one image
    (["--trainer-gpu", "NVIDIA_TESLA_T4:2"], f"{IMAGE}-gpu"),
    (["--trainer-gpu", "NVIDIA_L4", "--trainer-image", "europe-west4-docker.pkg.dev/p/r/cuda@sha256:" + "b" * 64],
     "europe-west4-docker.pkg.dev/p/r/cuda@sha256:" + "b" * 64),
])
def test_a_gpu_trainer_runs_the_cuda_image_and_only_the_trainer_does(tmp_path, extra, trainer):
    from click.testing import CliRunner

    from digits.cli import cli
    from pipeline.kubeflow import trainer_image_of

    output = tmp_path / "p.json"
    result = CliRunner().invoke(cli, compile_args(output, *extra))
    assert result.exit_code == 0, result.output
    job = json.loads(output.read_text())
    assert trainer_image_of(job) == trainer
    assert {spec["image"] for name, spec in containers(job).items() if name != "Trainer"} == {IMAGE}
    if extra:
        assert f"in {trainer}" in result.output


def test_without_kfp_pipeline_spec_the_error_says_what_to_install(monkeypatch):
    from pipeline.kubeflow import CompileError, require_runner

    monkeypatch.setitem(sys.modules, "kfp.pipeline_spec", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "kfp.pipeline_spec.pipeline_spec_pb2", None)
    with pytest.raises(CompileError, match="kfp-pipeline-spec==0.2.2"):
        require_runner()
