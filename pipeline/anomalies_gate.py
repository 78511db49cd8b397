"""Stops the pipeline when ExampleValidator found anomalies, naming each one.

TFX 1.16's ExampleValidator records anomalies but lets the run go on; this small
component reads its per-split SchemaDiff.pb files and fails with a readable
message, and Transform runs after it, so bad data never reaches training.
"""

# No `from __future__ import annotations`: TFX reads the component's type hints at runtime.
import os

from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx import v1 as tfx

SCHEMA_DIFF_FILE = "SchemaDiff.pb"  # what ExampleValidator writes in each Split-<name>/ directory


class DataAnomaliesError(RuntimeError):
    """The data does not match the curated schema."""


def describe_anomalies(anomalies_uri: str, splits: "list[str]") -> "list[str]":
    """One line per anomaly: '<split>: <feature>: <short description> (<detail>)'."""
    import tensorflow as tf

    found = []
    for split in splits:
        path = os.path.join(anomalies_uri, f"Split-{split}", SCHEMA_DIFF_FILE)
        anomalies = anomalies_pb2.Anomalies()
        with tf.io.gfile.GFile(path, "rb") as stream:
            anomalies.ParseFromString(stream.read())
        for feature, info in sorted(anomalies.anomaly_info.items()):
            details = "; ".join(reason.description for reason in info.reason) or info.description
            found.append(f"{split}: feature '{feature}': {info.short_description} ({details})")
        if anomalies.HasField("dataset_anomaly_info"):
            info = anomalies.dataset_anomaly_info
            found.append(f"{split}: dataset: {info.short_description} ({info.description})")
    return found


@tfx.dsl.components.component
def AnomaliesGate(anomalies: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleAnomalies]):
    """Raises DataAnomaliesError, failing the run, if any split has an anomaly."""
    import json

    splits = json.loads(anomalies.split_names)
    found = describe_anomalies(anomalies.uri, splits)
    if found:
        raise DataAnomaliesError(f"data anomalies, pipeline stopped before Transform: {' | '.join(found)}")
