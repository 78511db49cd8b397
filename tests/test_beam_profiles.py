"""Beam runner profiles: every one parsed by Beam itself; the local ones executed and compared."""

from __future__ import annotations

import pytest

from pipeline import beam

IMAGE = "europe-west4-docker.pkg.dev/my-project/digits/digits-pipeline:0.1.0"
# What a user adds for the profiles that run elsewhere.
REMOTE_ARGS = {
    "dataflow": ["--project=my-project", "--region=europe-west4", "--temp_location=gs://my-bucket/tmp"],
    "flink": ["--flink_master=flink-jobmanager:8081", "--flink_version=1.19"],
    "spark": ["--spark_master_url=spark://spark-master:7077"],
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
    assert options["sdk_container_image"] == IMAGE  # TFX's make_beam_dependency_flags looks for this
    if profile != "dataflow":
        assert options["environment_type"] == "DOCKER" and options["environment_config"] == IMAGE


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
    ("flink", ["--flink_master=f:8081", "--flink_version=1.12"], IMAGE, ["--flink_version", "1.12"]),
    ("spark", ["--spark_master_url=spark://s:7077", "--spark_version=2"], IMAGE, ["--spark_version", "'2'"]),
    ("flink", [], IMAGE, ["needs --flink_master"]),
    ("spark", ["--spark_master_url=spark://s:7077"], None, ["pipeline image", "--image"]),
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


@pytest.fixture(scope="module")
def beam_runs(tiny_records, pushed_model, tmp_path_factory):
    """The Beam components on the tiny data with each profile executed here, the same model evaluated."""
    from pipeline.beam_components import run_beam_components
    from pipeline.config import PipelineConfig

    model = next((pushed_model.parent.parent / "root" / "Trainer" / "model").iterdir())
    work = tmp_path_factory.mktemp("beam-profiles")
    runs = {}
    for profile, stages in STAGES.items():
        config = PipelineConfig(data_root=tiny_records, train_examples=180, pipeline_root=work / profile,
                                beam_pipeline_args=beam.profile_args(profile))
        runs[profile] = run_beam_components(config, stages, str(model))
    return runs


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("profile", ["local-mp", "portable"])
def test_other_runners_produce_what_the_in_process_runner_does(beam_runs, profile):
    from pipeline import beam_components as read

    local, other = beam_runs["local"].outputs, beam_runs[profile].outputs
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
