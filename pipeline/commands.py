"""`digits pipeline ...`: run the TFX pipeline from the command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from components.config import PRECISIONS, TrainerConfig
from pipeline import beam
from pipeline.config import BlessingGates, PipelineConfig


@click.group("pipeline")
def pipeline_group():
    """Run the TFX pipeline: validate, transform, train, evaluate, push."""


class _ConsoleFilter(logging.Filter):
    """Our own warnings on the console; libraries' only from ERROR up (all of it goes to the file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in ("pipeline", "components", "data", "tfrecord_builder")
        return record.levelno >= (logging.WARNING if ours else logging.ERROR)


def _setup_logging(log_dir: Path | None) -> Path | None:
    """Console: progress lines and real problems. File (when `log_dir` is given): everything, for when
    something fails."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [console]
    log_file = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / time.strftime("run-%Y%m%d-%H%M%S.log")
        to_file = logging.FileHandler(log_file)
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers.append(to_file)
    # TensorFlow gives its logger a handler of its own; send its records through ours instead.
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.handlers[:] = []
    tf_logger.propagate = True
    return log_file


def _training_options(command):
    """The Trainer's and the gates' options, shared by `run` and `compile`."""
    options = [
        click.option("--model-name", default="digits", show_default=True),
        click.option("--epochs", type=int, default=TrainerConfig.epochs, show_default=True),
        click.option("--batch-size", type=int, default=TrainerConfig.batch_size, show_default=True),
        click.option("--learning-rate", type=float, default=TrainerConfig.learning_rate, show_default=True),
        click.option("--optimizer", type=click.Choice(["rmsprop", "adam", "sgd"]), default=TrainerConfig.optimizer,
                     show_default=True),
        click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default=TrainerConfig.lr_schedule,
                     show_default=True, help="cosine: warm up, then decay to zero by the last epoch."),
        click.option("--warmup-epochs", type=float, default=TrainerConfig.warmup_epochs, show_default=True,
                     help="Epochs of linear learning-rate warm-up (cosine schedule)."),
        click.option("--steps-per-epoch", type=int, default=None, help="[default: one pass over the train split]"),
        click.option("--early-stopping-patience", type=int, default=TrainerConfig.early_stopping_patience,
                     show_default=True),
        click.option("--frozen-epochs", type=int, default=TrainerConfig.frozen_epochs, show_default=True,
                     help="With pretrained base weights: epochs that train the new head on a frozen base first."),
        click.option("--fine-tune-learning-rate", type=float, default=TrainerConfig.fine_tune_learning_rate,
                     show_default=True, help="With pretrained base weights: the rate after the frozen epochs."),
        click.option("--stroke-augmentation", type=float, default=TrainerConfig.stroke_probability,
                     show_default=True, help="Share of training images whose strokes are made thicker or thinner."),
        click.option("--blur-augmentation", type=float, default=TrainerConfig.blur_probability, show_default=True,
                     help="Share of training images blurred."),
        click.option("--scale-augmentation", type=float, default=TrainerConfig.max_scale_change, show_default=True,
                     help="Training images scaled at random by up to this share either way (0.1: 0.9-1.1x)."),
        click.option("--elastic-augmentation", type=float, default=TrainerConfig.elastic_alpha, show_default=True,
                     help="Elastic distortion of training digits: the scale of the smooth random field, in pixels "
                          "(0: off; 34: Simard et al.'s, about 1.4 pixels of movement)."),
        click.option("--outlier-share", type=float, default=TrainerConfig.outlier_share, show_default=True,
                     help="Non-digits in each training batch, as a share of the batch size (outlier exposure; "
                          "0: none, and the model answers everything with confidence)."),
        click.option("--outlier-weight", type=float, default=TrainerConfig.outlier_weight, show_default=True,
                     help="Weight of the non-digits' loss (their cross-entropy to the uniform answer) beside "
                          "the digits' own."),
        click.option("--answer-share", type=float, default=None,
                     help="The share of eval digits the exported model answers without a person; a third of "
                          "the rest it calls not a digit, two thirds unsure. [default: "
                          f"{TrainerConfig.abstention_ood_keep * TrainerConfig.abstention_confident_keep:.4f}: "
                          f"{TrainerConfig.abstention_ood_keep} x {TrainerConfig.abstention_confident_keep}]"),
        click.option("--precision", type=click.Choice(list(PRECISIONS)),
                     default=TrainerConfig.precision, show_default=True,
                     help="What training computes in; auto: float32 on a GPU, mixed_bfloat16 on CPUs with "
                          "bfloat16 instructions; mixed_float16 needs a GPU. The exported model is float32."),
        click.option("--min-accuracy", type=float, default=BlessingGates.min_accuracy, show_default=True,
                     help="Held-out accuracy needed to bless (and push) the model."),
        click.option("--max-accuracy-drop", type=float, default=BlessingGates.max_accuracy_drop, show_default=True,
                     help="How far held-out accuracy may fall below the latest blessed model's."),
        click.option("--min-class-recall", type=float, default=BlessingGates.min_class_recall, show_default=True,
                     help="Recall every digit needs on the held-out split."),
        click.option("--max-class-recall-drop", type=float, default=BlessingGates.max_class_recall_drop,
                     show_default=True, help="How far any digit's recall may fall below the latest blessed model's."),
        click.option("--min-coverage", type=float, default=BlessingGates.min_coverage, show_default=True,
                     help="Share of held-out digits the model must answer without a person (its exported decision)."),
        click.option("--max-coverage-drop", type=float, default=BlessingGates.max_coverage_drop, show_default=True,
                     help="How far that share may fall below the latest blessed model's."),
        click.option("--max-selective-error", type=float, default=BlessingGates.max_selective_error,
                     show_default=True, help="Error allowed among the answers the model gives without a person."),
        click.option("--max-selective-error-rise", type=float, default=BlessingGates.max_selective_error_rise,
                     show_default=True, help="How far that error may rise above the latest blessed model's."),
        click.option("--no-cache", is_flag=True, help="Re-run every component instead of reusing cached outputs."),
        click.option("--beam-profile", type=click.Choice(list(beam.PROFILES)), default=beam.DEFAULT_PROFILE,
                     show_default=True, help="Where the Beam components (ExampleGen, StatisticsGen, Transform, "
                     "Evaluator) run: local (in this process), local-mp (a process per core), portable (Beam's "
                     "Job API), dataflow, flink, spark."),
        click.option("--beam-arg", "beam_args", multiple=True, metavar="--OPTION=VALUE",
                     help="A Beam pipeline option added to the profile's (repeatable); one the profile sets "
                          "is replaced. Checked by Beam's own option parser."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _operating_point(answer_share: float) -> dict[str, float]:
    """The two shares kept (TrainerConfig's abstention_*) for a share of eval digits answered: of the
    digits not answered, one third is left to the out-of-distribution threshold, two thirds to confidence."""
    if not 0.5 <= answer_share <= 1.0:
        raise ValueError(f"the share answered must be between 0.5 and 1, got {answer_share}")
    ood_keep = 1.0 - (1.0 - answer_share) / 3.0
    return {"abstention_ood_keep": round(ood_keep, 6), "abstention_confident_keep": round(answer_share / ood_keep, 6)}


def _configs(options: dict, train_examples: int, **locations) -> PipelineConfig:
    """The typed configuration from the shared options; a bad value is a usage error in one line."""
    try:
        trainer = TrainerConfig(
            epochs=options["epochs"], batch_size=options["batch_size"], learning_rate=options["learning_rate"],
            optimizer=options["optimizer"], lr_schedule=options["lr_schedule"],
            warmup_epochs=options["warmup_epochs"], base_weights=options["base_weights"],
            steps_per_epoch=options["steps_per_epoch"], early_stopping_patience=options["early_stopping_patience"],
            frozen_epochs=options["frozen_epochs"], fine_tune_learning_rate=options["fine_tune_learning_rate"],
            stroke_probability=options["stroke_augmentation"], blur_probability=options["blur_augmentation"],
            max_scale_change=options["scale_augmentation"], elastic_alpha=options["elastic_augmentation"],
            precision=options["precision"], outlier_share=options["outlier_share"],
            outlier_weight=options["outlier_weight"],
            **(_operating_point(options["answer_share"]) if options["answer_share"] is not None else {}),
        )
        beam_args = beam.profile_args(options["beam_profile"], options["beam_args"], options.get("image"))
        return PipelineConfig(
            train_examples=train_examples, model_name=options["model_name"],
            gates=BlessingGates(min_accuracy=options["min_accuracy"], max_accuracy_drop=options["max_accuracy_drop"],
                                min_class_recall=options["min_class_recall"],
                                max_class_recall_drop=options["max_class_recall_drop"],
                                min_coverage=options["min_coverage"], max_coverage_drop=options["max_coverage_drop"],
                                max_selective_error=options["max_selective_error"],
                                max_selective_error_rise=options["max_selective_error_rise"]),
            trainer=trainer, enable_cache=not options["no_cache"], beam_pipeline_args=beam_args, **locations,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def _train_examples(data_root: str) -> int:
    """The train split's size from the build's manifest. A local build is verified shard by shard; a
    remote one (gs://...) is only read: checksumming it would download every shard."""
    from pipeline import uri
    from tfrecord_builder.manifest import MANIFEST_NAME, ManifestError, verify

    try:
        if not uri.is_remote(data_root):
            return verify(data_root)["splits"]["train"]["examples"]
        import tensorflow as tf

        manifest = uri.join(data_root, MANIFEST_NAME)
        if not tf.io.gfile.exists(manifest):
            raise ManifestError(f"{data_root} has no {MANIFEST_NAME}: not a complete TFRecord build")
        with tf.io.gfile.GFile(manifest) as stream:
            return json.load(stream)["splits"]["train"]["examples"]
    except ManifestError as error:
        message = str(error)
    except Exception as error:  # gfile's errors (no credentials, no such bucket), or not a manifest
        message = f"cannot read {uri.join(data_root, MANIFEST_NAME)}: {type(error).__name__}: " + (
            str(error).strip().splitlines() or [""])[0]
    click.echo(f"error: {message} (build it with `digits data build`, or pass --train-examples)", err=True)
    sys.exit(1)


@pipeline_group.command("run")
@click.option("--data", "data_root", default="data/tfrecords", show_default=True,
              help="A `digits data build` output directory: a path or a URI (gs://, s3://).")
@click.option("--pipeline-root", default="pipeline_root", show_default=True,
              help="Artifacts: a path or a URI. A local root also holds the MLMD sqlite database, logs and report.")
@click.option("--local-root", type=click.Path(path_type=Path), default=None,
              help="The MLMD sqlite database, logs and report [default: the pipeline root; needed when that "
                   "is a URI].")
@click.option("--serving-dir", default="serving_model", show_default=True,
              help="Blessed models are pushed to SERVING_DIR/<model-name>/<version>/ (a path or a URI).")
@click.option("--base-weights", default=TrainerConfig.base_weights, show_default=True,
              help="auto (ImageNet if in the Keras cache, else random), imagenet, none, or a weights file.")
@click.option("--image", default=None, help="The pipeline image (docker/pipeline/Dockerfile) that dataflow, "
              "flink and spark workers run.")
@_training_options
def run_command(data_root, pipeline_root, local_root, serving_dir, **options):
    """Run the whole pipeline on a TFRecord build, ending with a pushed model if it is blessed."""
    config = _configs(options, _train_examples(data_root), data_root=data_root, pipeline_root=pipeline_root,
                      local_root=local_root, serving_dir=serving_dir)
    if config.local_dir is None:
        raise click.UsageError(f"the pipeline root {config.pipeline_root} is remote: give the local runner a "
                               "directory for its sqlite metadata, logs and report with --local-root")

    from components import base_weights as weights_module
    from pipeline.anomalies_gate import DataAnomaliesError
    from pipeline.runner import run_pipeline

    trainer = config.trainer
    log_file = _setup_logging(config.local_dir / "logs")
    weights = weights_module.resolve(trainer.base_weights)  # logs a warning when falling back to random
    click.echo(f"pipeline '{config.pipeline_name}': {config.train_steps} training steps "
               f"({trainer.epochs} epochs x {config.steps_per_epoch}), base weights: {weights.source}, "
               f"Beam: {options['beam_profile']}")
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
    _write_report(config.local_dir, config.pipeline_name)


@pipeline_group.command("compile")
@click.option("--target", type=click.Choice(["vertex"]), default="vertex", show_default=True,
              help="vertex: the PipelineJob JSON that Vertex AI Pipelines runs (not Kubeflow Pipelines: "
                   "see docs/scale-out.md).")
@click.option("--image", required=True, help="The pipeline image (docker/pipeline/Dockerfile) every component "
              "runs, e.g. europe-west4-docker.pkg.dev/PROJECT/REPO/digits-pipeline:TAG.")
@click.option("--pipeline-root", required=True, help="Where the orchestrator keeps artifacts: gs://BUCKET/DIR.")
@click.option("--data", "data_root", required=True, help="The TFRecord build, uploaded: gs://BUCKET/DIR.")
@click.option("--serving-dir", required=True,
              help="Blessed models are pushed to SERVING_DIR/<model-name>/<version>/: gs://BUCKET/DIR.")
@click.option("--train-examples", type=int, default=None,
              help="Size of the train split [default: read from the build's manifest.json].")
@click.option("--base-weights", type=click.Choice(["imagenet", "none"]), default="imagenet", show_default=True,
              help="imagenet: the Trainer downloads them (the containers have internet); none: random.")
@click.option("--trainer-cpu", type=float, default=None, help="vCPUs for the Trainer's container.")
@click.option("--trainer-memory", "trainer_memory_gb", type=float, default=None, metavar="GB",
              help="Memory for the Trainer's container, in GB.")
@click.option("--trainer-gpu", default=None, metavar="TYPE[:COUNT]",
              help="GPUs for the Trainer, e.g. NVIDIA_L4 or NVIDIA_TESLA_T4:2 (several: MirroredStrategy). The "
                   "Trainer then runs the image's gpu target, IMAGE's tag + '-gpu', or --trainer-image.")
@click.option("--trainer-image", default=None, help="The GPU Trainer's image (docker build --target gpu) "
              "[default: --image's tag + '-gpu'].")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("build/vertex/pipeline.json"),
              show_default=True)
@_training_options
def compile_command(target, image, pipeline_root, data_root, serving_dir, train_examples, trainer_cpu,
                    trainer_memory_gb, trainer_gpu, trainer_image, output, **options):
    """Compile the pipeline for an orchestrator, offline (nothing is uploaded or submitted)."""
    from pipeline.kubeflow import CompileError, Resources, compile_pipeline, trainer_image_of

    options["image"] = image
    if train_examples is None:
        train_examples = _train_examples(data_root)
    config = _configs(options, train_examples, data_root=data_root, pipeline_root=pipeline_root,
                      serving_dir=serving_dir)
    try:
        gpu_type, gpu_count = Resources.parse_gpu(trainer_gpu)
        if options["precision"] == "mixed_float16" and gpu_type is None:
            raise CompileError("--precision mixed_float16 is for a GPU Trainer: add --trainer-gpu, or use float32")
        resources = Resources(cpu=trainer_cpu, memory_gb=trainer_memory_gb, gpu_type=gpu_type, gpu_count=gpu_count)
        job = compile_pipeline(config, image, output, resources, trainer_image_name=trainer_image)
    except CompileError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    tasks = job["pipelineSpec"]["root"]["dag"]["tasks"]
    gpu_note = (f", Trainer on {gpu_count} x {gpu_type} in {trainer_image_of(job)}" if gpu_type else "")
    click.echo(f"{target}: {len(tasks)} steps, image {image}, pipeline root {config.pipeline_root}, "
               f"Beam: {options['beam_profile']}{gpu_note}")
    click.echo(f"wrote {output}")


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}")
    return key, value


@pipeline_group.command("submit")
@click.argument("template", type=click.Path(dir_okay=False, path_type=Path), default=Path("build/vertex/pipeline.json"))
@click.option("--project", required=True, help="The Google Cloud project that runs it.")
@click.option("--region", required=True, help="Vertex AI's region, e.g. europe-west4 (where the bucket is).")
@click.option("--service-account", required=True, metavar="NAME@PROJECT.iam.gserviceaccount.com",
              help="The account every step runs as (roles: docs/scale-out.md); never the Compute Engine default.")
@click.option("--network", default=None, metavar="projects/NUMBER/global/networks/NAME",
              help="A VPC network peered with Vertex AI, for private access to what the steps reach.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="A label on the run (repeatable).")
@click.option("--cache/--no-cache", "cache", default=None,
              help="Reuse cached step results or not [default: as compiled; `compile --no-cache` turns it off].")
@click.option("--display-name", default="digits", show_default=True)
@click.option("--schedule", default=None, metavar="CRON",
              help="Create a schedule instead of one run, e.g. '0 3 * * *' (minute hour day month weekday).")
@click.option("--timezone", default="UTC", show_default=True, help="The schedule's IANA time zone.")
@click.option("--max-concurrent-runs", type=int, default=1, show_default=True,
              help="Scheduled runs at once; a run still going when the next is due makes that one wait its turn.")
@click.option("--dry-run", is_flag=True, help="Print the request as JSON and send nothing.")
def submit_command(template, project, region, service_account, network, labels, cache, display_name, schedule,
                   timezone, max_concurrent_runs, dry_run):
    """Run a compiled pipeline on Vertex AI Pipelines, once or on a schedule (needs Google Cloud credentials)."""
    from pipeline.vertex import SubmitError, Submission, request_json, submit

    if schedule is None and (timezone != "UTC" or max_concurrent_runs != 1):
        raise click.UsageError("--timezone and --max-concurrent-runs are for a --schedule")
    try:
        submission = Submission(
            template=template, project=project, region=region, service_account=service_account, network=network,
            labels=dict(_label(text) for text in labels), enable_caching=cache, display_name=display_name,
            schedule=schedule, timezone=timezone, max_concurrent_runs=max_concurrent_runs)
        if dry_run:
            click.echo(json.dumps(request_json(submission), indent=2, sort_keys=True))
            return
        name = submit(submission)
    except SubmitError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # the API's or the credentials' errors: one line
        reason = (str(error).strip().splitlines() or [""])[0]
        raise click.ClickException(f"cannot submit: {type(error).__name__}: {reason}") from None
    when = f" at '{schedule}' in {timezone}" if schedule else ""
    click.echo(f"created {name}{when}, running as {service_account}")


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
    _setup_logging(None)  # libraries' deprecation notices stay off the console, as during a run
    _write_report(pipeline_root, pipeline_name)
