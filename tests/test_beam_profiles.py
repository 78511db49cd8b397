"""Beam runner profiles: every one parsed by Beam itself; the local ones executed and compared."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import beam
from pipeline.beam_components import BeamRun

IMAGE = "europe-west4-docker.pkg.dev/my-project/digits/digits-pipeline:0.1.0"
# What a user adds for the profiles that run elsewhere.
REMOTE_ARGS = {
    "dataflow": ["--project=my-project", "--region=europe-west4", "--temp_location=gs://my-bucket/tmp"],
    "flink": ["--job_endpoint=flink-jobserver:8099", "--flink_version=1.19"],
    "spark": ["--job_endpoint=spark-jobserver:8099"],
}


@pytest.mark.parametrize("profile", list(beam.PROFILES))
def test_every_profile_is_accepted_by_beams_option_parser(profile):
    args = beam.profile_args(profile, REMOTE_ARGS.get(profile, []), image=IMAGE)
    beam.validate(args, beam.PROFILES[profile])  # idempotent: the result parses again
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    runner = PipelineOptions(list(args)).view_as(StandardOptions).runner
    assert runner == {"local": "FnApiRunner", "local-mp": "FnApiRunner", "portable": "PortableRunner",
                      "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}[profile]


@pytest.mark.parametrize("profile", ["dataflow", "flink", "spark"])
def test_remote_workers_run_the_pipeline_image_so_tfx_ships_no_sdist_of_itself(profile):
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(list(beam.profile_args(profile, REMOTE_ARGS[profile], image=IMAGE))).get_all_options()
    if profile == "dataflow":  # the root target of the same image (Dataflow's workers run as root)
        assert options["sdk_container_image"] == IMAGE + "-dataflow"
        assert (options["machine_type"], options["max_num_workers"]) == ("n2-standard-4", 10)
        return
    assert options["sdk_container_image"] == IMAGE  # TFX's make_beam_dependency_flags looks for this
    assert options["environment_type"] == "DOCKER" and options["environment_config"] == IMAGE


@pytest.mark.parametrize("args, here", [
    (beam.LOCAL.args, True), (beam.LOCAL_MP.args, True), (beam.PORTABLE.args, True),
    (("--runner=DirectRunner",), True), ((), True),
    (("--runner=FlinkRunner", "--job_endpoint=localhost:8099", "--environment_type=LOOPBACK"), True),
    (("--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=EXTERNAL",
      "--environment_config=localhost:50000"), False),
    (("--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=DOCKER"), False),
    *[(beam.profile_args(profile, REMOTE_ARGS[profile], image=IMAGE), False)
      for profile in ("dataflow", "flink", "spark")],
])
def test_tfx_ships_an_sdist_of_itself_only_to_workers_that_are_not_this_interpreter(args, here):
    assert beam.workers_are_this_interpreter(args) is here


@pytest.mark.parametrize("image, dataflow", [
    (IMAGE, IMAGE + "-dataflow"), (IMAGE + "-dataflow", IMAGE + "-dataflow"),
    ("localhost:5000/digits-pipeline:1", "localhost:5000/digits-pipeline:1-dataflow"),
])
def test_dataflow_runs_the_root_target_of_the_image_by_its_tag(image, dataflow):
    assert beam.dataflow_image(image) == dataflow


@pytest.mark.parametrize("image", ["localhost:5000/digits-pipeline", f"{IMAGE}@sha256:{'a' * 64}"])
def test_a_dataflow_image_that_cannot_be_derived_must_be_named(image):
    with pytest.raises(beam.BeamArgsError, match="--sdk_container_image=IMAGE"):
        beam.profile_args("dataflow", REMOTE_ARGS["dataflow"], image=image)
    named = beam.profile_args("dataflow", [*REMOTE_ARGS["dataflow"], "--sdk_container_image=r/root:1"], image=image)
    assert "--sdk_container_image=r/root:1" in named


@pytest.mark.parametrize("profile", ["flink", "spark"])
def test_a_worker_pool_beside_each_cluster_worker_is_the_other_accepted_harness(profile):
    from apache_beam.options.pipeline_options import PipelineOptions

    args = beam.profile_args(profile, [*REMOTE_ARGS[profile], "--environment_type=EXTERNAL",
                                       "--environment_config=localhost:50000"], image=IMAGE)
    options = PipelineOptions(list(args)).get_all_options()
    assert (options["environment_type"], options["environment_config"]) == ("EXTERNAL", "localhost:50000")
    assert options["sdk_container_image"] == IMAGE


def test_the_default_is_the_in_process_profile():
    from pipeline.config import PipelineConfig

    assert beam.DEFAULT_PROFILE == "local"
    assert PipelineConfig(data_root="d", train_examples=1).beam_pipeline_args == beam.PROFILES["local"].args


def test_a_beam_arg_replaces_the_profiles_option_of_the_same_name():
    args = beam.profile_args("local-mp", ["--direct_num_workers=2"])
    assert args.count("--direct_num_workers=2") == 1 and "--direct_num_workers=0" not in args


@pytest.mark.parametrize("profile, extra, image, words", [
    ("local", ["--direct_num_worker=2"], None, ["--direct_num_worker=2", "did you mean --direct_num_workers"]),
    ("local", ["--direct_running_mode=fast"], None, ["invalid choice", "fast"]),
    ("flink", ["--job_endpoint=j:8099", "--flink_version=1.12"], IMAGE, ["--flink_version", "1.12"]),
    ("spark", ["--job_endpoint=j:8099", "--spark_version=2"], IMAGE, ["--spark_version", "'2'"]),
    ("flink", [], IMAGE, ["needs the Job API endpoint", "--job_endpoint=HOST:8099", "download the job-server jar"]),
    ("spark", [], IMAGE, ["beam_spark3_job_server", "--job_endpoint=HOST:8099"]),
    ("flink", ["--flink_master=flink-jobmanager:8081"], IMAGE, ["--flink_master makes Beam download", "java"]),
    ("flink", ["--job_endpoint=j:8099", "--flink_master=f:8081"], IMAGE, ["--flink_master makes Beam download"]),
    ("flink", ["--job_endpoint=j:8099", "--flink_submit_uber_jar"], IMAGE, ["--flink_submit_uber_jar"]),
    ("spark", ["--spark_master_url=spark://s:7077"], IMAGE, ["--spark_master_url makes Beam download"]),
    ("spark", ["--job_endpoint=j:8099", "--spark_submit_uber_jar", "--spark_rest_url=http://s:6066"], IMAGE,
     ["--spark_submit_uber_jar"]),
    ("flink", ["--job_endpoint=embed"], IMAGE, ["in-process job server", "--beam-profile portable"]),
    ("flink", ["--job_endpoint=flink-jobserver"], IMAGE, ["HOST:PORT"]),
    ("flink", ["--job_endpoint=j:8099", "--environment_type=LOOPBACK"], IMAGE, ["DOCKER", "EXTERNAL"]),
    ("spark", ["--job_endpoint=j:8099", "--environment_type=PROCESS"], IMAGE, ["does not run the pipeline image"]),
    ("flink", ["--job_endpoint=j:8099", "--environment_type=EXTERNAL"], IMAGE, ["EXTERNAL needs", "worker pool"]),
    ("spark", ["--job_endpoint=j:8099"], None, ["pipeline image", "--image"]),
    ("dataflow", [], IMAGE, ["needs --project, --region, --temp_location"]),
    ("dataflow", REMOTE_ARGS["dataflow"], None, ["pipeline image", "--sdk_container_image"]),
    ("dataflow", ["--project=my-project", "--region=europe-west4", "--temp_location=/tmp/x"], IMAGE,
     ["--temp_location", "gs://"]),
    ("dataflow", ["--project=My_Project", "--region=europe-west4", "--temp_location=gs://b/t"], IMAGE, ["--project"]),
    ("prism", [], None, ["unknown Beam profile", "local, local-mp"]),
])
def test_bad_beam_arguments_are_refused_in_one_line(profile, extra, image, words):
    with pytest.raises(beam.BeamArgsError) as error:
        beam.profile_args(profile, extra, image=image)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_the_cli_refuses_a_misspelt_beam_arg_before_running_anything(tiny_records, tmp_path):
    from test_remote_storage import digits

    result = digits("pipeline", "run", "--data", tiny_records, "--pipeline-root", tmp_path / "root",
                    "--beam-arg=--direct_num_worker=2")
    assert result.exit_code == 2, result.output
    assert "did you mean --direct_num_workers" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "root").exists()


# What each executed profile runs. The Evaluator is compared on the portable runner only: each
# multi-process stage starts worker processes that import TensorFlow (~60 s for the Evaluator on
# 2 cores), and the suite has a time budget.
STAGES = {"local": ("statistics", "transform", "evaluate"), "portable": ("statistics", "transform", "evaluate"),
          "local-mp": ("statistics", "transform")}


SDK_WORKER = "apache_beam.runners.worker.sdk_worker_main"  # the command of Beam's worker processes


@dataclass
class BeamSeen:
    """What Beam did while one profile ran, seen from this process: no profile can pass for another."""

    runners: list[tuple[str, str]] = field(default_factory=list)  # (runner class, direct_running_mode) per pipeline
    processes: list[tuple[int, subprocess.Popen]] = field(default_factory=list, repr=False)  # (pipeline, process)
    log: list[str] = field(default_factory=list, repr=False)  # Beam's own log messages

    def workers(self) -> list[tuple[int, subprocess.Popen]]:
        return [(pipeline, process) for pipeline, process in self.processes if SDK_WORKER in str(process.args)]

    def logged(self, pattern: str) -> list[str]:
        return [match[1] for message in self.log if (match := re.fullmatch(pattern, message, re.DOTALL))]


@dataclass(frozen=True)
class ProfileRun:
    run: BeamRun
    seen: BeamSeen


class _BeamLog(logging.Handler):
    def __init__(self, seen: BeamSeen):
        super().__init__(logging.INFO)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.log.append(record.getMessage())


@contextlib.contextmanager
def watching_beam():
    """Records the runner of every Beam pipeline run, every process started, and Beam's log (INFO and up)."""
    import apache_beam
    from apache_beam.options.pipeline_options import DirectOptions

    seen = BeamSeen()
    run_pipeline = apache_beam.Pipeline.run

    def run(pipeline, *args, **kwargs):
        mode = pipeline._options.view_as(DirectOptions).direct_running_mode
        seen.runners.append((type(pipeline.runner).__name__, mode))
        return run_pipeline(pipeline, *args, **kwargs)

    class RecordedPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.processes.append((len(seen.runners) - 1, self))

    handler, logger = _BeamLog(seen), logging.getLogger("apache_beam")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(apache_beam.Pipeline, "run", run)
            patch.setattr(subprocess, "Popen", RecordedPopen)
            yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def beam_runs(tiny_records, pushed_model, tmp_path_factory) -> dict[str, ProfileRun]:
    """The Beam components on the tiny data with each profile executed here, the same model evaluated,
    with what Beam was seen doing during each run."""
    from pipeline.beam_components import run_beam_components
    from pipeline.config import PipelineConfig

    model = next((pushed_model.parent.parent / "root" / "Trainer" / "model").iterdir())
    work = tmp_path_factory.mktemp("beam-profiles")
    runs = {}
    for profile, stages in STAGES.items():
        config = PipelineConfig(data_root=tiny_records, train_examples=180, pipeline_root=work / profile,
                                beam_pipeline_args=beam.profile_args(profile))
        with watching_beam() as seen:
            run = run_beam_components(config, stages, str(model))
        runs[profile] = ProfileRun(run, seen)
    return runs


@pytest.mark.slow
@pytest.mark.e2e
def test_the_in_process_profile_runs_every_pipeline_in_this_process(beam_runs):
    """The baseline of the comparison: FnApiRunner in memory, no worker process, no job service."""
    seen = beam_runs["local"].seen
    assert seen.runners
    assert set(seen.runners) == {("FnApiRunner", "in_memory")}
    assert seen.workers() == [] and seen.logged(r"Running job '(.+)'") == []


@pytest.mark.slow
@pytest.mark.e2e
def test_the_multi_process_profile_runs_every_pipeline_on_worker_processes_one_per_core(beam_runs):
    """Beam's SDK workers were separate processes that started and exited cleanly, for every pipeline."""
    seen = beam_runs["local-mp"].seen
    assert seen.runners
    assert set(seen.runners) == {("FnApiRunner", "multi_processing")}
    workers = seen.workers()
    per_pipeline = {pipeline: 0 for pipeline in range(len(seen.runners))}
    for pipeline, _ in workers:
        per_pipeline[pipeline] += 1
    assert set(per_pipeline.values()) == {multiprocessing.cpu_count()}, per_pipeline
    assert all(process.pid != os.getpid() and process.returncode == 0 for _, process in workers), \
        [(process.pid, process.returncode) for _, process in workers]


@pytest.mark.slow
@pytest.mark.e2e
def test_the_portable_profile_submits_every_pipeline_as_a_job_whose_worker_comes_from_the_loopback_pool(beam_runs):
    """Each pipeline went through the Job API (a job that reached DONE), and the job's runner asked the
    LOOPBACK worker pool this process started for its SDK worker: no worker process, no in-process runner."""
    seen = beam_runs["portable"].seen
    assert seen.runners
    assert {runner for runner, _ in seen.runners} == {"PortableRunner"}
    assert seen.workers() == []
    jobs = seen.logged(r"Running job '(job-[-0-9a-f]+)'")
    assert len(set(jobs)) == len(seen.runners), jobs
    assert seen.logged(r"Job state changed to (DONE)") == ["DONE"] * len(seen.runners)
    pools = seen.logged(r"Listening for workers at (localhost:\d+)")
    requested = seen.logged(r"Requesting worker at (localhost:\d+)")
    assert len(requested) == len(seen.runners) and set(requested) <= set(pools), (requested, pools)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("profile", ["local-mp", "portable"])
def test_other_runners_produce_what_the_in_process_runner_does(beam_runs, profile):
    from pipeline import beam_components as read

    local, other = beam_runs["local"].run.outputs, beam_runs[profile].run.outputs
    counts = read.example_counts(local["ImportExampleGen.examples"])
    assert counts == {"train": 180, "eval": 20, "test": 50}
    assert read.example_counts(other["ImportExampleGen.examples"]) == counts
    assert read.statistics(other["StatisticsGen.statistics"]) == read.statistics(local["StatisticsGen.statistics"])
    transformed = read.transformed_examples(local["Transform.transformed_examples"])
    assert {split: len(rows) for split, rows in transformed.items()} == counts
    assert read.transformed_examples(other["Transform.transformed_examples"]) == transformed
    if "evaluate" in STAGES[profile]:
        metrics = read.evaluation(local["Evaluator.evaluation"])
        assert metrics["example_count"] == 50 and "sparse_categorical_accuracy" in metrics
        assert read.evaluation(other["Evaluator.evaluation"]) == metrics


# -- Flink's and Spark's shape, executed: a job server and a worker pool of their own ------------------------------

@dataclass
class JobServices:
    """Beam's Python job server (the Job API a Flink or Spark job server speaks) and an external worker
    pool (what the pipeline image runs as a sidecar with --worker_pool), each a separate process."""

    job_endpoint: str
    pool: str
    processes: list[subprocess.Popen]
    logs: dict[str, Path]

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")


@pytest.fixture(scope="module")
def job_services(tmp_path_factory):
    import sys
    import time

    from prometheus_api import free_port

    work = tmp_path_factory.mktemp("job-services")
    job_port, pool_port = free_port(), free_port()
    # The pool starts workers with `python -c ...`: this environment's, as the image's PATH gives /opt/venv's.
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    commands = {"job": ["apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)],
                "pool": ["apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)]}
    logs, processes = {}, []
    try:
        for name, command in commands.items():
            logs[name] = work / f"{name}.log"
            with open(logs[name], "w") as out:
                processes.append(subprocess.Popen([sys.executable, "-m", *command], stdout=out,
                                                  stderr=subprocess.STDOUT, env=env, cwd=work))
        services = JobServices(f"localhost:{job_port}", f"localhost:{pool_port}", processes, logs)
        deadline = time.monotonic() + 120
        while "Listening for beam jobs" not in services.log("job"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), services.log("job")
            time.sleep(0.2)
        yield services
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("profile", ["flink", "spark"])
def test_the_cluster_profiles_run_through_a_job_server_and_a_worker_pool_without_a_jar(
        profile, job_services, beam_runs, tiny_records, tmp_path):
    """FlinkRunner / SparkRunner as the profiles configure them, with --job_endpoint and the EXTERNAL
    harness: every pipeline is a job on the separate job server, its SDK workers come from the separate
    worker pool, this process starts no java and downloads no jar, and the outputs equal the in-process
    runner's. (Flink's and Spark's own job servers are Java and are not run here.)"""
    from pipeline import beam_components as read
    from pipeline.beam_components import run_beam_components
    from pipeline.config import PipelineConfig

    args = beam.profile_args(profile, [f"--job_endpoint={job_services.job_endpoint}", "--environment_type=EXTERNAL",
                                       f"--environment_config={job_services.pool}"], image=IMAGE)
    jobs_before = job_services.log("job").count("Running job")
    workers_before = job_services.log("pool").count("Starting worker")
    config = PipelineConfig(data_root=tiny_records, train_examples=180, pipeline_root=tmp_path / profile,
                            beam_pipeline_args=args)
    with watching_beam() as seen:
        run = run_beam_components(config, ("statistics",))
    assert {runner for runner, _ in seen.runners} == {"FlinkRunner" if profile == "flink" else "SparkRunner"}
    assert len(seen.runners) == 2  # ImportExampleGen and StatisticsGen
    started = [str(process.args) for _, process in seen.processes]
    assert not [command for command in started if "java" in command or ".jar" in command], started
    assert seen.logged(r"Job state changed to (DONE)") == ["DONE"] * 2
    assert job_services.log("job").count("Running job") - jobs_before == 2
    assert job_services.log("job").count(f"Requesting worker at {job_services.pool}") >= 2
    assert job_services.log("pool").count("Starting worker") - workers_before >= 2
    local = beam_runs["local"].run.outputs
    assert read.example_counts(run.outputs["ImportExampleGen.examples"]) == {"train": 180, "eval": 20, "test": 50}
    assert read.statistics(run.outputs["StatisticsGen.statistics"]) == read.statistics(
        local["StatisticsGen.statistics"])
