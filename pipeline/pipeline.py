"""The TFX pipeline, as one pure function of its configuration.

ImportExampleGen -> StatisticsGen -> ImportSchemaGen (curated) -> ExampleValidator
-> AnomaliesGate -> Transform -> Trainer -> (latest blessed model) -> Evaluator -> Pusher
-> RunReport (the run report, an artifact of the run).
"""

from __future__ import annotations

import json

import tensorflow_model_analysis as tfma
from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec

from components.config import CODE_FINGERPRINT_KEY
from data import contract
from pipeline.anomalies_gate import AnomaliesGate
from pipeline.config import BlessingGates, PipelineConfig
from pipeline import selective_metrics
from pipeline.pusher import DeduplicatingPusherExecutor
from pipeline.report_component import RunReport

PREPROCESSING_FN = "components.transform.preprocessing_fn"


def example_gen_component(config: PipelineConfig):
    return tfx.components.ImportExampleGen(
        input_base=config.data_root,
        input_config=tfx.proto.Input(
            splits=[tfx.proto.Input.Split(name=split, pattern=f"{split}/*.tfrecord.gz") for split in contract.SPLITS]
        ),
    )


def transform_component(config: PipelineConfig, examples, schema, materialize: bool = False):
    return tfx.components.Transform(
        examples=examples,
        schema=schema,
        preprocessing_fn=PREPROCESSING_FN,
        splits_config=tfx.proto.SplitsConfig(analyze=[contract.TRAIN_SPLIT],
                                             transform=list(contract.SPLITS) if materialize else []),
        # 75x75x3 floats are ~67 KB a digit: the Trainer applies the graph on the fly instead.
        materialize=materialize,
        disable_statistics=True,
        custom_config={CODE_FINGERPRINT_KEY: config.code_fingerprint},
    )


def evaluator_component(config: PipelineConfig, examples, model, baseline_model=None):
    return tfx.components.Evaluator(
        examples=examples,
        example_splits=[contract.TEST_SPLIT],
        model=model,
        baseline_model=baseline_model,
        eval_config=eval_config(config.gates),
    )


def create_pipeline(config: PipelineConfig) -> tfx.dsl.Pipeline:
    example_gen = example_gen_component(config)
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=config.schema_file)
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    anomalies_gate = AnomaliesGate(anomalies=example_validator.outputs["anomalies"])

    transform = transform_component(config, example_gen.outputs["examples"], schema_gen.outputs["schema"])
    transform.add_upstream_node(anomalies_gate)

    trainer = tfx.components.Trainer(
        run_fn=config.run_fn,
        examples=example_gen.outputs["examples"],
        transform_graph=transform.outputs["transform_graph"],
        schema=schema_gen.outputs["schema"],
        train_args=tfx.proto.TrainArgs(splits=[contract.TRAIN_SPLIT], num_steps=config.train_steps),
        eval_args=tfx.proto.EvalArgs(splits=[contract.EVAL_SPLIT]),
        custom_config={**config.trainer.to_custom_config(), CODE_FINGERPRINT_KEY: config.code_fingerprint},
    )

    model_resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")

    evaluator = evaluator_component(config, example_gen.outputs["examples"], trainer.outputs["model"],
                                    model_resolver.outputs["model"])
    pusher = tfx.components.Pusher(
        # TFX's Pusher, except that a model already in the serving directory is not pushed again.
        custom_executor_spec=executor_spec.ExecutorClassSpec(DeduplicatingPusherExecutor),
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=config.serving_model_dir)
        ),
    )

    # Last, after the Pusher: the page about this run, from its artifacts (pipeline/report.py's ROLES).
    run_report = RunReport(
        statistics=statistics_gen.outputs["statistics"], anomalies=example_validator.outputs["anomalies"],
        model_run=trainer.outputs["model_run"], model=trainer.outputs["model"],
        evaluation=evaluator.outputs["evaluation"], blessing=evaluator.outputs["blessing"],
        pushed_model=pusher.outputs["pushed_model"],
        pipeline_name=config.pipeline_name, data_root=config.data_root,
    )

    return tfx.dsl.Pipeline(
        pipeline_name=config.pipeline_name,
        pipeline_root=config.pipeline_root,
        components=[
            example_gen, statistics_gen, schema_gen, example_validator, anomalies_gate, transform, trainer,
            model_resolver, evaluator, pusher, run_report,
        ],
        enable_cache=config.enable_cache,
        # The local runner's MLMD store; orchestrators such as Vertex AI bring their own.
        metadata_connection_config=(
            tfx.orchestration.metadata.sqlite_metadata_connection_config(str(config.metadata_path))
            if config.metadata_path is not None else None
        ),
        beam_pipeline_args=list(config.beam_pipeline_args),
    )


PER_CLASS_METRICS = ("Precision", "Recall", "F1Score")


def per_class_metric_name(metric: str, digit: int) -> str:
    return f"{metric.lower()}_class_{digit}"


BAR_TOLERANCE = 1e-6


def _gate(slicing_spec: tfma.SlicingSpec, bar: float, allowed_change: float,
          higher_is_better: bool = True) -> tfma.PerSliceMetricThreshold:
    """On one slice: an absolute bar (a floor where higher is better, else a ceiling), and no move
    the wrong way against the latest blessed model larger than allowed."""
    bound = "lower_bound" if higher_is_better else "upper_bound"
    # TFMA computes its metrics in float32: 95 right of 100 is 0.94999999, which a floor of 0.95
    # refused. The bar is widened by BAR_TOLERANCE (and read back without it).
    widened = bar - BAR_TOLERANCE if higher_is_better else bar + BAR_TOLERANCE
    return tfma.PerSliceMetricThreshold(
        slicing_specs=[slicing_spec],
        threshold=tfma.MetricThreshold(
            value_threshold=tfma.GenericValueThreshold(**{bound: {"value": widened}}),
            change_threshold=tfma.GenericChangeThreshold(
                direction=(tfma.MetricDirection.HIGHER_IS_BETTER if higher_is_better
                           else tfma.MetricDirection.LOWER_IS_BETTER),
                # TFMA's change is candidate - baseline; 1e-10 rather than 0 keeps "no change at all"
                # from failing on rounding.
                absolute={"value": max(allowed_change, 1e-10) * (-1 if higher_is_better else 1)},
            ),
        ),
    )


def label_slice(digit: int) -> tfma.SlicingSpec:
    """The test examples of one digit: accuracy there is that digit's recall at the argmax."""
    return tfma.SlicingSpec(feature_values={contract.LABEL_KEY: str(digit)})


def gates_from_eval_config(config: tfma.EvalConfig) -> BlessingGates | None:
    """The gates an EvalConfig made by `eval_config` carries (the run report reads them back from
    the Evaluator's configuration in MLMD); None if it has no accuracy thresholds."""
    overall, per_digit, coverage, selective = None, None, None, None

    def allowed(change: float) -> float:
        # eval_config floors an allowed change of 0 at 1e-10 (see _gate); read it back as 0.
        change = abs(change)
        return 0.0 if change <= 1e-9 else change

    for spec in config.metrics_specs:
        for metric in spec.metrics:
            for gate in metric.per_slice_thresholds:
                bounds = gate.threshold.value_threshold
                change = allowed(gate.threshold.change_threshold.absolute.value)
                floor = round(bounds.lower_bound.value + BAR_TOLERANCE, 9)
                ceiling = round(bounds.upper_bound.value - BAR_TOLERANCE, 9)
                if metric.class_name == selective_metrics.SelectiveError.__name__:
                    selective = (ceiling, change)
                elif metric.class_name == selective_metrics.Coverage.__name__:
                    coverage = (floor, change)
                elif metric.class_name != "SparseCategoricalAccuracy":
                    continue
                elif any(not s.feature_keys and not s.feature_values for s in gate.slicing_specs):
                    overall = (floor, change)
                elif per_digit is None:
                    per_digit = (floor, change)
    if overall is None or per_digit is None:
        return None
    # An Evaluator configured before the selective gates existed had none: report the defaults' absence
    # as no bar at all rather than as today's defaults.
    coverage = coverage or (0.0, 1.0)
    selective = selective or (1.0, 1.0)
    return BlessingGates(min_accuracy=overall[0], max_accuracy_drop=overall[1],
                         min_class_recall=per_digit[0], max_class_recall_drop=per_digit[1],
                         min_coverage=coverage[0], max_coverage_drop=coverage[1],
                         max_selective_error=selective[0], max_selective_error_rise=selective[1])


def eval_config(gates: BlessingGates) -> tfma.EvalConfig:
    """Held-out metrics: accuracy overall and per digit, coverage and the error among accepted answers
    at the exported operating point (the blessing gates), per-class precision, recall and F1, and the
    confusion matrix."""
    # Argmax-based per-class metrics: top_k=1 sets every other class's score to -inf. The explicit
    # threshold 0 matters: with top_k, TFMA's default threshold is -inf, and then every example
    # counts as a positive for every class (precision = class share, recall = 1). They are reported,
    # not gated: TFMA keys them with a class sub-key that thresholds cannot name.
    per_class = [
        tfma.MetricConfig(
            class_name=metric,
            config=json.dumps({"class_id": digit, "top_k": 1, "thresholds": [0.0],
                               "name": per_class_metric_name(metric, digit)}),
        )
        for digit in range(contract.NUM_CLASSES)
        for metric in PER_CLASS_METRICS
    ]
    accuracy = tfma.MetricConfig(
        class_name="SparseCategoricalAccuracy",
        config=json.dumps({"name": contract.ACCURACY_METRIC}),
        # Per slice, so that the overall bar does not apply to each digit's slice and vice versa. On a
        # digit's slice, accuracy is that digit's recall: the original project's failure was a model
        # good overall and bad at one digit (its 8s).
        per_slice_thresholds=[
            _gate(tfma.SlicingSpec(), gates.min_accuracy, gates.max_accuracy_drop),
            *(_gate(label_slice(digit), gates.min_class_recall, gates.max_class_recall_drop)
              for digit in range(contract.NUM_CLASSES)),
        ],
    )
    # Selective prediction reads two outputs (`decision` and `probabilities`): TFMA hands a custom
    # metric the model's whole output dict; prediction_key only picks the one the standard metrics see.
    overall = tfma.SlicingSpec()
    selective = [
        tfma.MetricConfig(class_name=selective_metrics.Coverage.__name__, module=selective_metrics.__name__,
                          config=json.dumps({"name": contract.COVERAGE_METRIC}),
                          per_slice_thresholds=[_gate(overall, gates.min_coverage, gates.max_coverage_drop)]),
        tfma.MetricConfig(class_name=selective_metrics.SelectiveError.__name__, module=selective_metrics.__name__,
                          config=json.dumps({"name": contract.SELECTIVE_ERROR_METRIC}),
                          per_slice_thresholds=[_gate(overall, gates.max_selective_error,
                                                      gates.max_selective_error_rise, higher_is_better=False)]),
    ]
    return tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                # Load as a plain SavedModel and call the signature: loading it as a Keras model
                # made the Evaluator ~3.5x slower (139 s vs 39 s on 50 digits) for the same metrics.
                model_type=tfma.TF_GENERIC,
                signature_name=contract.EXAMPLES_SIGNATURE,
                label_key=contract.LABEL_KEY,
                prediction_key=contract.PROBABILITIES_OUTPUT,
            )
        ],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[contract.LABEL_KEY])],
        metrics_specs=[
            tfma.MetricsSpec(
                metrics=[
                    tfma.MetricConfig(class_name="ExampleCount"),
                    accuracy,
                    *selective,
                    *per_class,
                    tfma.MetricConfig(class_name="MultiClassConfusionMatrixPlot"),
                ]
            )
        ],
    )
