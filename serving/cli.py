"""`digits serve` (the TF Serving-compatible model server) and `digits predict` (its client)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import click

from serving.config import BATCH_WAITS, BatchingConfig, ServerConfig, batching_from_file
from serving.ports import PortError, reserve_all
from serving.runtime import ONEDNN_ENV, select_kernels

DEFAULT_MODEL_DIR = Path("serving_model") / "digits"  # where `digits pipeline run` pushes


def _label(value: str) -> tuple[str, int]:
    name, _, version = value.partition("=")
    if not name or not version.isdigit():
        raise click.BadParameter(f"expected NAME=VERSION (for example stable=1700000000), got {value!r}")
    return name, int(version)


@click.command("serve")
@click.option("--model-dir", type=click.Path(path_type=Path), default=DEFAULT_MODEL_DIR, show_default=True,
              help="The model's base path: one numbered directory per version (the Pusher's layout).")
@click.option("--model-name", default=ServerConfig.model_name, show_default=True, help="Name in URLs and ModelSpecs.")
@click.option("--host", default=ServerConfig.host, show_default=True, help="Interface to listen on.")
@click.option("--rest-port", type=int, default=ServerConfig.rest_port, show_default=True,
              help="REST port (0: any free port).")
@click.option("--grpc-port", type=int, default=ServerConfig.grpc_port, show_default=True,
              help="gRPC port (0: any free port).")
@click.option("--num-versions", type=int, default=ServerConfig.num_versions, show_default=True,
              help="Version policy: keep the newest N versions loaded.")
@click.option("--label", "labels", multiple=True, metavar="NAME=VERSION",
              help="Version label, e.g. --label stable=1700000000 (repeatable).")
@click.option("--poll-interval", type=float, default=ServerConfig.poll_interval_s, show_default=True,
              help="Seconds between scans of --model-dir for new or removed versions.")
@click.option("--batching/--no-batching", default=True, show_default=True, help="Server-side batching.")
@click.option("--max-batch-size", type=int, default=BatchingConfig.max_batch_size, show_default=True,
              help="Most examples per request and per batch (TF Serving's max_batch_size).")
@click.option("--batch-timeout-micros", type=int, default=BatchingConfig.batch_timeout_micros, show_default=True,
              help="Longest wait of a batch that is not full for more requests (TF Serving's batch_timeout_micros).")
@click.option("--batch-wait", type=click.Choice(BATCH_WAITS), default=BatchingConfig.batch_wait, show_default=True,
              help="always: every batch that is not full waits the whole timeout (TF Serving); arriving: only "
                   "while requests are on their way to its queue, so a lone request never waits.")
@click.option("--batching-parameters-file", type=click.Path(path_type=Path), default=None,
              help="Take the batching settings from a TF Serving BatchingParameters file "
                   "(e.g. docker/batching_parameters.txt) instead of --max-batch-size and --batch-timeout-micros.")
@click.option("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes, show_default=True)
@click.option("--max-instances", type=int, default=ServerConfig.max_instances, show_default=True,
              help="Most examples in one request.")
@click.option("--max-concurrent-requests", type=int, default=ServerConfig.max_concurrent_requests,
              show_default=True, help="Predict calls in flight, REST and gRPC together; more get 429 / "
                                      "RESOURCE_EXHAUSTED. Status and metadata requests are not limited.")
@click.option("--rest-api-timeout-in-ms", "rest_api_timeout_ms", type=int, default=ServerConfig.rest_api_timeout_ms,
              show_default=True, help="A REST predict still queued after this long is dropped (TF Serving's flag; "
                                      "gRPC calls carry their own deadline).")
@click.option("--body-timeout", type=float, default=ServerConfig.body_timeout_s, show_default=True,
              help="Seconds a REST request body may take to arrive after its headers; then 408.")
@click.option("--shutdown-grace", type=float, default=ServerConfig.shutdown_grace_s, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM.")
@click.option("--warmup/--no-warmup", default=ServerConfig.warmup, show_default=True,
              help="Replay the model's assets.extra/tf_serving_warmup_requests before serving a version.")
@click.option("--onednn/--no-onednn", default=ServerConfig.onednn, show_default=True, envvar=ONEDNN_ENV,
              show_envvar=True,
              help="TensorFlow's oneDNN CPU kernels; off: its Eigen kernels, as in TF Serving's CPU image "
                   "(faster batches here, see docs/serving.md).")
@click.option("--intra-op-threads", type=int, default=ServerConfig.intra_op_threads, show_default=True,
              help="Threads one op may use (TF Serving's --tensorflow_intra_op_parallelism); 0: TensorFlow's choice.")
@click.option("--inter-op-threads", type=int, default=ServerConfig.inter_op_threads, show_default=True,
              help="Ops run at once (TF Serving's --tensorflow_inter_op_parallelism); 0: TensorFlow's choice.")
def serve_command(model_dir, model_name, host, rest_port, grpc_port, num_versions, labels, poll_interval, batching,
                  max_batch_size, batch_timeout_micros, batch_wait, batching_parameters_file, max_body_bytes,
                  max_instances, max_concurrent_requests, rest_api_timeout_ms, body_timeout, shutdown_grace, warmup,
                  onednn, intra_op_threads, inter_op_threads):
    """Serve the pushed model versions over TF Serving's REST and gRPC APIs, with its Prometheus metrics."""
    try:
        if batching_parameters_file:
            batching_config = dataclasses.replace(batching_from_file(batching_parameters_file), batch_wait=batch_wait)
        else:
            batching_config = BatchingConfig(batch_timeout_micros=batch_timeout_micros,
                                             batch_wait=batch_wait).with_max_batch_size(max_batch_size)
        if not batching:
            batching_config = dataclasses.replace(batching_config, enabled=False)
        config = ServerConfig(
            model_base_path=model_dir, model_name=model_name, host=host, rest_port=rest_port, grpc_port=grpc_port,
            num_versions=num_versions, labels=tuple(_label(label) for label in labels),
            poll_interval_s=poll_interval,
            batching=batching_config,
            max_body_bytes=max_body_bytes, max_instances=max_instances,
            max_concurrent_requests=max_concurrent_requests, rest_api_timeout_ms=rest_api_timeout_ms,
            body_timeout_s=body_timeout,
            shutdown_grace_s=shutdown_grace, warmup=warmup,
            onednn=onednn, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if not model_dir.is_dir():
        raise click.ClickException(f"no model directory at {model_dir}: run `digits pipeline run` first, "
                                   f"or point --model-dir at a directory of numbered SavedModel versions")
    # The ports before anything slow: a taken port is one line now, not a traceback after ~30 s of
    # importing TensorFlow and loading the model. Bound, not listening, until the versions are loaded.
    try:
        sockets = tuple(reserve_all(config.ports()))
    except PortError as error:
        raise click.ClickException(f"cannot start the server: {error}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # From here on a stop signal ends the command quietly with 0, even while TensorFlow is still
    # being imported (the server installs its own handlers once its event loop runs).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_before_serving)
    select_kernels(config.onednn)  # before TensorFlow loads: it reads the choice once
    logging.getLogger(__name__).info("starting: importing TensorFlow")

    def ready(endpoints) -> None:
        versions = ", ".join(map(str, endpoints.versions)) or "none yet (waiting for a push)"
        click.echo(f"serving {model_name} (versions: {versions}) from {model_dir}")
        click.echo(f"  REST    http://{host}:{endpoints.rest_port}/v1/models/{model_name}")
        click.echo(f"  gRPC    {host}:{endpoints.grpc_port}")
        click.echo(f"  metrics http://{host}:{endpoints.rest_port}/monitoring/prometheus/metrics")
        click.echo("ready (Ctrl-C or SIGTERM to stop)", err=False)
        sys.stdout.flush()

    try:
        from serving.server import serve  # TensorFlow: only once the arguments are known to be good

        serve(config, on_ready=ready, sockets=sockets)
    except _StoppedBeforeServing:
        logging.getLogger(__name__).info("stopped during start-up")
    except OSError as error:
        raise click.ClickException(f"cannot start the server: {error.strerror or error}") from None
    click.echo("stopped")
    # Threads the grace period did not wait for (a version load, a request past it) must not hold
    # the exit, nor interpreter shutdown tear TensorFlow down under them: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


class _StoppedBeforeServing(BaseException):
    """SIGTERM or SIGINT arrived before the server's event loop took over the signals.

    A BaseException, like KeyboardInterrupt: an `except Exception` in the code it interrupts (an
    import, say) must not swallow it.
    """


def _stop_before_serving(signum, frame) -> None:
    raise _StoppedBeforeServing()


@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--rest", "rest_url", default=None, help="REST base URL [default: http://127.0.0.1:8501].")
@click.option("--grpc", "grpc_target", default=None, metavar="HOST:PORT", help="Use gRPC instead of REST.")
@click.option("--model-name", default="digits", show_default=True)
@click.option("--version", type=int, default=None, help="A specific model version.")
@click.option("--label", default=None, help="A version label, e.g. stable.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the server.")
@click.option("--batch-size", type=click.IntRange(min=1), default=BatchingConfig.max_batch_size, show_default=True,
              help="Images per request: at most the server's max_batch_size (TF Serving refuses larger requests).")
@click.option("--show-input", is_flag=True,
              help="Also draw the 28x28 image the model classified (its normalised input), in text.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="For a file of digits (a Kaggle CSV or an IDX image file): the CSV of answers to write.")
@click.option("--submission", is_flag=True,
              help="For a file of digits: write Kaggle's submission format, ImageId,Label, and nothing else.")
@click.option("--concurrency", type=click.IntRange(min=1, max=64), default=2, show_default=True,
              help="For a file of digits: requests in flight at once.")
def predict_command(images, rest_url, grpc_target, model_name, version, label, timeout, batch_size, show_input,
                    out, submission, concurrency):
    """Print the predicted digit and its confidence for each image file, and the model's verdict when it
    would not answer alone: "not a digit", or "unsure: 3 or 8 (0.52 / 0.41)" for a person to look at.

    Given one file of digits instead (Kaggle's test.csv, or an IDX image file such as
    t10k-images-idx3-ubyte.gz), write a CSV of answers to --out: ImageId, Label, confidence, the
    model's decision and its second choice, or with --submission Kaggle's ImageId,Label."""
    from serving.batch import is_batch_input
    from serving.client import GrpcClient, RestClient, ServerError

    if rest_url and grpc_target:
        raise click.UsageError("give --rest or --grpc, not both")
    if version is not None and label is not None:
        raise click.UsageError("give --version or --label, not both")
    if any(path.is_file() and is_batch_input(path) for path in images):
        if len(images) != 1:
            raise click.UsageError("give one file of digits (a CSV or an IDX image file) alone, without other files")
        if out is None:
            raise click.UsageError(f"{images[0]} is a file of digits: say where to write the answers with --out FILE")
        if show_input:
            raise click.UsageError("--show-input is for image files, not a file of digits")
        _predict_file(images[0], out, rest_url, grpc_target, model_name, version, label, timeout, batch_size,
                      submission, concurrency)
        return
    if out is not None or submission:
        raise click.UsageError("--out and --submission are for one file of digits (a Kaggle CSV or an IDX image "
                               "file); image files are answered on the terminal")
    payloads = []
    for path in images:
        try:
            payloads.append(path.read_bytes())
        except OSError as error:
            raise click.ClickException(f"cannot read {path}: {error.strerror}") from None
    client = (GrpcClient(grpc_target, model_name, timeout, batch_size) if grpc_target
              else RestClient(rest_url or "http://127.0.0.1:8501", model_name, timeout, batch_size))
    try:
        answers = client.predict(payloads, version=version, label=label, with_image=show_input)
    except ServerError as error:
        raise click.ClickException(f"the server refused: {error}") from None
    width = max(len(str(path)) for path in images)
    for path, answer in zip(images, answers):
        # The model's guess always; its verdict when it would not answer alone ("not a digit", "unsure: 3 or 8").
        note = ("  no ink found: a guess on an empty image" if answer.blank
                else f"  {answer.describe()}" if answer.accepted is False else "")
        click.echo(f"{str(path):<{width}}  {answer.digit}  ({answer.confidence:.3f}){note}")
        if answer.normalized_image is not None:
            click.echo(_text_picture(answer.normalized_image))


def _predict_file(source_path: Path, out: Path, rest_url, grpc_target, model_name, version, label, timeout,
                  batch_size, submission, concurrency) -> None:
    """`digits predict FILE --out ANSWERS.csv`: every digit of a CSV or IDX file through the server."""
    from rich.console import Console

    from serving.batch import BatchError, open_input, per_thread, predict_file
    from serving.client import GrpcClient, RestClient, ServerError

    try:
        source = open_input(source_path)
        if out.exists() and out.resolve() == source_path.resolve():
            raise BatchError(f"--out {out} is the input file")
    except BatchError as error:
        raise click.ClickException(str(error)) from None
    grpc_client = GrpcClient(grpc_target, model_name, timeout, batch_size) if grpc_target else None
    client = ((lambda: grpc_client) if grpc_client is not None else
              per_thread(lambda: RestClient(rest_url or "http://127.0.0.1:8501", model_name, timeout, batch_size)))

    def predict(images: list[bytes]):
        return client().predict(images, version=version, label=label)

    try:
        client().status(version)  # one line now if the server or the model is not there
    except ServerError as error:
        raise click.ClickException(f"the server refused: {error}") from None
    console = Console(stderr=True)
    console.print(f"{source_path.name}: {source.count:,} digits ({source.kind.upper()}, {source.rows}x{source.cols}"
                  f"{', labelled' if source.labelled else ''}) -> {out}", highlight=False)
    try:
        with _batch_progress(console) as on_progress:
            result = predict_file(source, out, predict, batch_size, concurrency, submission, on_progress)
    except BatchError as error:
        raise click.ClickException(f"{error}; nothing written to {out}") from None
    finally:
        if grpc_client is not None:
            grpc_client.close()
    decisions = ", ".join(f"{count:,} {name.replace('_', ' ')}" for name, count in result.decisions.most_common()
                          if name != "none")
    click.echo(f"{result.rows:,} answers written to {out} in {result.seconds:.1f} s "
               f"({result.per_second:,.0f} digits/s, {result.requests:,} requests of at most {batch_size}"
               f"{f', {result.retries} asked again: server busy' if result.retries else ''})"
               f"{f': {decisions}' if decisions else ''}")
    if result.labelled:
        accepted = (f"; on the {result.accepted_labelled:,} the model accepted: "
                    f"{result.accepted_correct / result.accepted_labelled:.4f}"
                    if result.accepted_labelled and result.accepted_labelled != result.labelled else "")
        click.echo(f"accuracy against the file's labels: {result.correct / result.labelled:.4f} "
                   f"({result.correct:,} of {result.labelled:,}){accepted}")


@contextlib.contextmanager
def _batch_progress(console):
    """A live bar on a terminal; a line every tenth of the file in a log."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if console.is_terminal:
        columns = (TextColumn("[bold]predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("predict", total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)
        return
    shown = [0]

    def log(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0]:
            shown[0] = tenth
            console.print(f"predicted {done:,} of {total:,}", highlight=False)

    yield log


def _text_picture(image) -> str:
    """A 28x28 image in [0, 1] as 14 lines of half-block characters (two pixel rows per line)."""
    shades = " ░▒▓█"

    def shade(value: float) -> str:
        return shades[min(len(shades) - 1, int(value * len(shades)))]

    return "\n".join("".join(shade(max(top, bottom)) for top, bottom in zip(image[row], image[row + 1]))
                     for row in range(0, len(image) - 1, 2))
