"""Locations stay strings: gs:// and s3:// survive into the components' arguments; local runs are unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import uri
from pipeline.config import PipelineConfig

REMOTE_ROOTS = [
    ("gs://digits-bucket/data/tfrecords", "gs://digits-bucket/runs/root", "gs://digits-bucket/serving"),
    ("s3://digits-bucket/data/tfrecords", "s3://digits-bucket/runs/root", "s3://digits-bucket/serving"),
]


@pytest.mark.parametrize("given, expected", [
    ("gs://bucket/dir", "gs://bucket/dir"),
    ("gs://bucket/dir/", "gs://bucket/dir"),
    ("s3://bucket/a/b", "s3://bucket/a/b"),
    ("hdfs://namenode:8020/x", "hdfs://namenode:8020/x"),
])
def test_uris_are_kept_as_given(given, expected):
    assert uri.is_remote(given)
    assert uri.normalize(given) == expected


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not uri.is_remote("pipeline_root")
    assert uri.normalize("pipeline_root") == str(tmp_path / "pipeline_root")
    assert uri.normalize(f"file://{tmp_path}/x/../y") == str(tmp_path / "y")


@pytest.mark.parametrize("bad", ["", "gs://", "s3:///"])
def test_empty_locations_are_refused(bad):
    with pytest.raises(ValueError):
        uri.normalize(bad)


def test_join_keeps_a_uri_a_uri():
    assert uri.join("gs://b/root/", "_schema", "abc", "schema.pbtxt") == "gs://b/root/_schema/abc/schema.pbtxt"
    assert uri.join("/local/root", "a", "b") == "/local/root/a/b"


@pytest.mark.parametrize("data, root, serving", REMOTE_ROOTS)
def test_remote_locations_reach_the_components_unchanged(data, root, serving):
    from pipeline.pipeline import create_pipeline

    config = PipelineConfig(data_root=data, train_examples=100, pipeline_root=root, serving_dir=serving,
                            schema_file=f"{root}/_schema/0123/schema.pbtxt")
    assert (config.data_root, config.pipeline_root, config.serving_dir) == (data, root, serving)
    assert config.local_dir is None and config.metadata_path is None  # the sqlite store must be local

    pipeline = create_pipeline(config)
    assert pipeline.pipeline_info.pipeline_root == root
    assert pipeline.metadata_connection_config is None
    components = {component.id: component for component in pipeline.components}
    assert components["ImportExampleGen"].exec_properties["input_base"] == data
    assert components["ImportSchemaGen"].exec_properties["schema_file"] == f"{root}/_schema/0123/schema.pbtxt"
    from test_vertex_compile import push_directory

    assert push_directory(components["Pusher"].exec_properties["push_destination"]) == f"{serving}/digits"


def test_a_local_run_is_configured_as_before(tmp_path):
    from pipeline.pipeline import create_pipeline

    config = PipelineConfig(data_root=tmp_path / "data", train_examples=100, pipeline_root=tmp_path / "root",
                            serving_dir=tmp_path / "serving")
    assert config.metadata_path == tmp_path / "root" / "metadata.sqlite"
    pipeline = create_pipeline(config)
    assert pipeline.pipeline_info.pipeline_root == str(tmp_path / "root")
    assert pipeline.metadata_connection_config.sqlite.filename_uri == str(tmp_path / "root" / "metadata.sqlite")
    components = {component.id: component for component in pipeline.components}
    assert components["ImportExampleGen"].exec_properties["input_base"] == str(tmp_path / "data")


def test_a_remote_root_keeps_the_local_runners_files_in_the_local_root(tmp_path):
    config = PipelineConfig(data_root="gs://b/data", train_examples=1, pipeline_root="gs://b/root",
                            local_root=tmp_path / "local")
    assert config.metadata_path == tmp_path / "local" / "metadata.sqlite"


def test_the_schema_is_copied_by_content_through_tf_io_gfile():
    """TensorFlow's in-memory filesystem (ram://) stands in for a bucket: same gfile calls, no network."""
    import tensorflow as tf

    from pipeline.config import SCHEMA_FILE
    from pipeline.runner import content_addressed_schema

    root = "ram://digits-test/root"
    config = PipelineConfig(data_root="ram://digits-test/data", train_examples=1, pipeline_root=root)
    target = content_addressed_schema(config)
    assert target.startswith(f"{root}/_schema/") and target.endswith("/schema.pbtxt")
    with tf.io.gfile.GFile(target, "rb") as copied:
        assert copied.read() == Path(SCHEMA_FILE).read_bytes()
    assert content_addressed_schema(config) == target  # the same content, the same place
    assert [name for name in tf.io.gfile.listdir(target.rsplit("/", 1)[0])] == ["schema.pbtxt"]  # no temp left


def digits(*args) -> "click.testing.Result":
    """The real command line, in this process (TensorFlow is imported once for the whole session)."""
    from click.testing import CliRunner

    from digits.cli import cli

    return CliRunner().invoke(cli, [str(arg) for arg in args])


def test_run_with_a_remote_root_and_no_local_root_is_a_usage_error(tiny_records):
    result = digits("pipeline", "run", "--data", tiny_records, "--pipeline-root", "gs://bucket/root")
    assert result.exit_code == 2 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert "--local-root" in result.output and "Traceback" not in result.output


def test_an_unreadable_remote_manifest_is_one_line(tmp_path):
    result = digits("pipeline", "run", "--data", "ram://nothing-here/tfrecords", "--pipeline-root", tmp_path / "root")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: ram://nothing-here/tfrecords has no manifest.json: not a complete TFRecord build "
        "(build it with `digits data build`, or pass --train-examples)"]
