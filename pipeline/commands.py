"""`digits pipeline ...`: run the TFX pipeline from the command line."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from components.config import TrainerConfig
from pipeline.config import BlessingGates, PipelineConfig


@click.group("pipeline")
def pipeline_group():
    """Run the TFX pipeline: validate, transform, train, evaluate, push."""


class _ConsoleFilter(logging.Filter):
    """Our own warnings on the console; libraries' only from ERROR up (all of it goes to the file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in ("pipeline", "components", "data", "tfrecord_builder")
        return record.levelno >= (logging.WARNING if ours else logging.ERROR)


def _setup_logging(log_dir: Path) -> Path:
    """Console: progress lines and real problems. File: everything, for when something fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / time.strftime("run-%Y%m%d-%H%M%S.log")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    to_file = logging.FileHandler(log_file)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [console, to_file]
    # TensorFlow gives its logger a handler of its own; send its records through ours instead.
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.handlers[:] = []
    tf_logger.propagate = True
    return log_file


@pipeline_group.command("run")
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=Path("data/tfrecords"),
              show_default=True, help="A `digits data build` output directory.")
@click.option("--pipeline-root", type=click.Path(path_type=Path), default=Path("pipeline_root"), show_default=True,
              help="Artifacts, logs and the MLMD sqlite database.")
@click.option("--serving-dir", type=click.Path(path_type=Path), default=Path("serving_model"), show_default=True,
              help="Blessed models are pushed to SERVING_DIR/<model-name>/<version>/.")
@click.option("--model-name", default="digits", show_default=True)
@click.option("--epochs", type=int, default=TrainerConfig.epochs, show_default=True)
@click.option("--batch-size", type=int, default=TrainerConfig.batch_size, show_default=True)
@click.option("--learning-rate", type=float, default=TrainerConfig.learning_rate, show_default=True)
@click.option("--optimizer", type=click.Choice(["rmsprop", "adam", "sgd"]), default=TrainerConfig.optimizer,
              show_default=True)
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default=TrainerConfig.lr_schedule,
              show_default=True, help="cosine: warm up, then decay to zero by the last epoch.")
@click.option("--warmup-epochs", type=float, default=TrainerConfig.warmup_epochs, show_default=True,
              help="Epochs of linear learning-rate warm-up (cosine schedule).")
@click.option("--base-weights", default=TrainerConfig.base_weights, show_default=True,
              help="auto (ImageNet if in the Keras cache, else random), imagenet, none, or a weights file.")
@click.option("--steps-per-epoch", type=int, default=None, help="[default: one pass over the train split]")
@click.option("--early-stopping-patience", type=int, default=TrainerConfig.early_stopping_patience,
              show_default=True)
@click.option("--frozen-epochs", type=int, default=TrainerConfig.frozen_epochs, show_default=True,
              help="With pretrained base weights: epochs that train the new head on a frozen base first.")
@click.option("--fine-tune-learning-rate", type=float, default=TrainerConfig.fine_tune_learning_rate,
              show_default=True, help="With pretrained base weights: the rate after the frozen epochs.")
@click.option("--stroke-augmentation", type=float, default=TrainerConfig.stroke_probability, show_default=True,
              help="Share of training images whose strokes are made thicker or thinner.")
@click.option("--blur-augmentation", type=float, default=TrainerConfig.blur_probability, show_default=True,
              help="Share of training images blurred.")
@click.option("--precision", type=click.Choice(["auto", "float32", "mixed_bfloat16"]),
              default=TrainerConfig.precision, show_default=True,
              help="What training computes in; auto: mixed_bfloat16 on CPUs with bfloat16 instructions. "
                   "The exported model is float32 either way.")
@click.option("--min-accuracy", type=float, default=BlessingGates.min_accuracy, show_default=True,
              help="Held-out accuracy needed to bless (and push) the model.")
@click.option("--max-accuracy-drop", type=float, default=BlessingGates.max_accuracy_drop, show_default=True,
              help="How far held-out accuracy may fall below the latest blessed model's.")
@click.option("--min-class-recall", type=float, default=BlessingGates.min_class_recall, show_default=True,
              help="Recall every digit needs on the held-out split.")
@click.option("--max-class-recall-drop", type=float, default=BlessingGates.max_class_recall_drop,
              show_default=True, help="How far any digit's recall may fall below the latest blessed model's.")
@click.option("--no-cache", is_flag=True, help="Re-run every component instead of reusing cached outputs.")
def run_command(data_root, pipeline_root, serving_dir, model_name, epochs, batch_size, learning_rate, optimizer,
                lr_schedule, warmup_epochs, base_weights, steps_per_epoch, early_stopping_patience,
                frozen_epochs, fine_tune_learning_rate, stroke_augmentation, blur_augmentation, precision,
                min_accuracy, max_accuracy_drop, min_class_recall, max_class_recall_drop, no_cache):
    """Run the whole pipeline on a TFRecord build, ending with a pushed model if it is blessed."""
    from tfrecord_builder.manifest import ManifestError, verify

    try:
        manifest = verify(data_root)
    except ManifestError as error:
        click.echo(f"error: {error} (build it with `digits data build`)", err=True)
        sys.exit(1)
    try:
        trainer = TrainerConfig(
            epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
            lr_schedule=lr_schedule, warmup_epochs=warmup_epochs, base_weights=base_weights, steps_per_epoch=steps_per_epoch,
            early_stopping_patience=early_stopping_patience, frozen_epochs=frozen_epochs,
            fine_tune_learning_rate=fine_tune_learning_rate, stroke_probability=stroke_augmentation,
            blur_probability=blur_augmentation, precision=precision,
        )
        config = PipelineConfig(
            data_root=data_root, train_examples=manifest["splits"]["train"]["examples"],
            pipeline_root=pipeline_root, serving_dir=serving_dir, model_name=model_name,
            gates=BlessingGates(min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop,
                                min_class_recall=min_class_recall, max_class_recall_drop=max_class_recall_drop),
            trainer=trainer, enable_cache=not no_cache,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None

    from components import base_weights as weights_module
    from pipeline.anomalies_gate import DataAnomaliesError
    from pipeline.runner import run_pipeline

    log_file = _setup_logging(config.pipeline_root / "logs")
    weights = weights_module.resolve(trainer.base_weights)  # logs a warning when falling back to random
    click.echo(f"pipeline '{config.pipeline_name}': {config.train_steps} training steps "
               f"({trainer.epochs} epochs x {config.steps_per_epoch}), base weights: {weights.source}")
    click.echo(f"full log: {log_file}")

    def on_event(event, component):
        if event == "running":
            click.echo(f"  - {component.node_id} ...")
        else:
            mark = {"COMPLETE": "done", "CACHED": "cached"}.get(component.state, component.state.lower())
            click.echo(f"  - {component.node_id}: {mark} in {component.seconds:.1f} s")

    started = time.perf_counter()
    try:
        run_pipeline(config, on_event=on_event)
    except DataAnomaliesError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except Exception as error:  # a component failed: say which and why, in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        click.echo(f"error: pipeline failed: {type(error).__name__}: {reason} (full log: {log_file})", err=True)
        sys.exit(1)
    click.echo(f"pipeline finished in {time.perf_counter() - started:.0f} s")
    _write_report(config.pipeline_root, config.pipeline_name)


def _write_report(pipeline_root: Path, pipeline_name: str) -> None:
    from pipeline.report import ReportError, write_report

    try:
        report = write_report(pipeline_root, pipeline_name)
    except ReportError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except Exception as error:  # a damaged artifact must not end in a traceback
        logging.getLogger(__name__).exception("report failed")
        click.echo(f"error: could not write the report: {type(error).__name__}: {error}", err=True)
        sys.exit(1)
    click.echo(report.summary)
    click.echo(f"report: {report.path}")


@pipeline_group.command("report")
@click.option("--pipeline-root", type=click.Path(path_type=Path), default=Path("pipeline_root"), show_default=True)
@click.option("--pipeline-name", default="digits", show_default=True)
def report_command(pipeline_root, pipeline_name):
    """Write PIPELINE_ROOT/report/index.html about the latest run: data, training, metrics, blessing, push."""
    if not (pipeline_root / "metadata.sqlite").exists():
        click.echo(f"error: {pipeline_root} has no metadata.sqlite; run `digits pipeline run` first", err=True)
        sys.exit(1)
    _write_report(pipeline_root, pipeline_name)
