"""The pipeline's Beam components on their own: for comparing Beam runners and measuring scale.

ImportExampleGen, StatisticsGen, Transform (materialized here, so its output can be compared) and,
given a trained model, the Evaluator: built by the same functions as the full pipeline
(pipeline/pipeline.py), run by TFX's LocalDagRunner with a Beam profile's arguments. What each
produced is read back into plain Python values, so two runs can be compared for equality.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from data import contract
from pipeline.config import PipelineConfig


@dataclass(frozen=True)
class BeamRun:
    seconds: dict[str, float]  # component id -> wall time
    outputs: dict[str, str]  # "<component>.<output>" -> artifact URI


def create_beam_pipeline(config: PipelineConfig, stages=("statistics", "transform"), model_uri: str | None = None,
                         materialize: bool = True):
    from tfx import v1 as tfx

    from pipeline.pipeline import evaluator_component, example_gen_component, transform_component

    example_gen = example_gen_component(config)
    examples = example_gen.outputs["examples"]
    components = [example_gen]
    if "statistics" in stages:
        components.append(tfx.components.StatisticsGen(examples=examples))
    if "transform" in stages:
        schema_gen = tfx.components.ImportSchemaGen(schema_file=config.schema_file)
        components += [schema_gen, transform_component(config, examples, schema_gen.outputs["schema"],
                                                       materialize=materialize)]
    if "evaluate" in stages:
        if model_uri is None:
            raise ValueError("the Evaluator needs a model (model_uri)")
        model = tfx.dsl.Importer(source_uri=model_uri, artifact_type=tfx.types.standard_artifacts.Model
                                 ).with_id("model_importer")
        components += [model, evaluator_component(config, examples, model.outputs["result"])]
    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name, pipeline_root=config.pipeline_root, components=components,
        enable_cache=False,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(config.metadata_path)),
        beam_pipeline_args=list(config.beam_pipeline_args),
    )


def run_beam_components(config: PipelineConfig, stages=("statistics", "transform"),
                        model_uri: str | None = None, materialize: bool = True) -> BeamRun:
    """Runs the stages with the config's Beam arguments; returns wall times and output URIs."""
    from tfx import v1 as tfx

    from pipeline.run_history import latest_run_outputs
    from pipeline.runner import no_tfx_sdist_for_local_workers, prepare, run_scratch

    config = prepare(dataclasses.replace(config, enable_cache=False))
    with run_scratch(config.local_dir), no_tfx_sdist_for_local_workers(config.beam_pipeline_args):
        tfx.orchestration.LocalDagRunner().run(create_beam_pipeline(config, stages, model_uri, materialize))
    components, outputs = latest_run_outputs(config.metadata_path, config.pipeline_name)
    failed = [c.node_id for c in components if c.state not in ("COMPLETE", "CACHED")]
    if failed:
        raise RuntimeError(f"components did not complete: {', '.join(failed)}")
    return BeamRun(
        seconds={c.node_id: c.seconds for c in components},
        outputs={f"{node}.{key}": artifact.uri for node, produced in outputs.items()
                 for key, artifact in produced.items()},
    )


def example_counts(examples_uri: str) -> dict[str, int]:
    """Records per split in an ExampleGen output (gzipped TFRecords)."""
    import tensorflow as tf

    counts = {}
    for split in contract.SPLITS:
        files = tf.io.gfile.glob(f"{examples_uri}/Split-{split}/*")
        counts[split] = sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    return counts


def statistics(statistics_uri: str) -> dict[str, dict]:
    """Per split: example count and, per feature, its numeric or string summary (rounded)."""
    import tensorflow_data_validation as tfdv
    from google.protobuf import json_format

    found = {}
    for split in contract.SPLITS:
        stats = tfdv.load_stats_binary(f"{statistics_uri}/Split-{split}/FeatureStats.pb").datasets[0]
        features = {}
        for feature in stats.features:
            summary = json_format.MessageToDict(feature)
            summary.pop("path", None)
            features[".".join(feature.path.step)] = _rounded(summary)
        found[split] = {"examples": stats.num_examples, "features": features}
    return found


def _rounded(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def transformed_examples(transformed_uri: str) -> dict[str, list[bytes]]:
    """Per split, the transformed examples (deterministically serialised), sorted: runners may reorder them."""
    import tensorflow as tf

    found = {}
    for split in contract.SPLITS:
        rows = []
        for path in sorted(tf.io.gfile.glob(f"{transformed_uri}/Split-{split}/*")):
            for record in tf.data.TFRecordDataset([path], compression_type="GZIP" if path.endswith(".gz") else ""):
                rows.append(tf.train.Example.FromString(record.numpy()).SerializeToString(deterministic=True))
        found[split] = sorted(rows)
    return found


def evaluation(evaluation_uri: str) -> dict[str, float]:
    """Overall metrics of an Evaluator output, by name."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_eval_result(evaluation_uri)
    overall = result.get_metrics_for_slice()
    return {name: round(float(value.get("doubleValue", 0.0)), 6) for name, value in overall.items()
            if "doubleValue" in value}
