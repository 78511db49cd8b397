"""`digits web`: the page where a person draws or uploads a digit, sees the answer, and corrects it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import click

from serving.ports import Port, PortError, reserve
from web.config import DEFAULT_FEEDBACK_DIR, DEFAULT_PORT, DEFAULT_SERVING_URL, REVIEW_TOKEN_ENV, WebConfig


@click.command("web")
@click.option("--serving-url", default=None, metavar="URL",
              help=f"REST base URL of TF Serving or `digits serve` (default: {DEFAULT_SERVING_URL}).")
@click.option("--grpc", "grpc_target", default=None, metavar="HOST:PORT",
              help="Talk to the model server's gRPC API instead of REST.")
@click.option("--model-name", default="digits", show_default=True)
@click.option("--host", default=WebConfig.host, show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="Port (0: any free port).")
@click.option("--feedback-dir", type=click.Path(path_type=Path), default=DEFAULT_FEEDBACK_DIR, show_default=True,
              help="Where corrections are stored (mnist-png layout + feedback.jsonl); "
                   "`digits data build --extra-source` trains on them.")
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The model server's base path (e.g. serving_model/digits, read-only is enough): each answering "
                   "version's reference profile is exported for the drift alerts, which the TF Serving "
                   "container does not export itself.")
@click.option("--model-timeout", type=float, default=WebConfig.model_timeout_s, show_default=True,
              help="Seconds to wait for the model server before telling the page it is too slow.")
@click.option("--max-image-bytes", type=int, default=WebConfig.max_image_bytes, show_default=True)
@click.option("--model-connections", type=int, default=WebConfig.model_connections, show_default=True,
              help="Predicts sent to the model server at once; more wait (up to --model-timeout, then 503). "
                   "Match the model server's admission limit (digits serve --max-concurrent-requests).")
@click.option("--predicts-per-minute", type=int, default=WebConfig.predicts_per_minute, show_default=True,
              help="Predictions one client (address) may ask for per minute; more get 429 with Retry-After.")
@click.option("--feedback-per-minute", type=int, default=WebConfig.feedback_per_minute, show_default=True,
              help="Judgements one client may send per minute; more get 429 with Retry-After.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A Host name the app answers (repeatable); others get 421. Default: loopback names when "
                   "--host is loopback (a DNS-rebinding page is refused), any name otherwise.")
@click.option("--allowed-origin", "allowed_origins", multiple=True, metavar="SCHEME://HOST[:PORT]",
              help="An origin besides the page's own that may send predictions and corrections (repeatable).")
@click.option("--max-pending", type=int, default=WebConfig.max_pending, show_default=True,
              help="Corrections that may wait for a reviewer; more get 503 until some are reviewed.")
@click.option("--pending-per-client", type=int, default=WebConfig.pending_per_client, show_default=True,
              help="Of those, from one client (address); more get 429.")
@click.option("--form", "form_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The form POST /api/read-sheet reads (a form description, YAML or JSON, as for `digits read "
                   "--form`). Default: the example tally form, forms/tally.yaml.")
@click.option("--sheets-per-minute", type=int, default=WebConfig.sheets_per_minute, show_default=True,
              help="Sheet photos one client may send to /api/read-sheet per minute; more get 429 with Retry-After.")
@click.option("--max-pending-sheets", type=int, default=WebConfig.max_pending_sheets, show_default=True,
              help="Sheets that may wait for a person on the review page; past this a sheet is read but not queued.")
@click.option("--pending-sheets-per-client", type=int, default=WebConfig.pending_sheets_per_client,
              show_default=True, help="Of those, from one client (address).")
@click.option("--review-token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A file holding the reviewers' token: serves the review page at /review (not linked from "
                   "the public page). Or set DIGITS_REVIEW_TOKEN. Default: no review page.")
def web_command(serving_url, grpc_target, model_name, host, port, feedback_dir, model_dir, model_timeout,
                max_image_bytes, model_connections, predicts_per_minute, feedback_per_minute, allowed_hosts,
                allowed_origins, max_pending, pending_per_client, form_path, sheets_per_minute, max_pending_sheets,
                pending_sheets_per_client, review_token_file):
    """Serve the web page: draw or upload a digit, see what the model answers, correct it."""
    if review_token_file is not None and not review_token_file.is_file():
        raise click.ClickException(f"--review-token-file {review_token_file} is not a file")
    if serving_url is None and grpc_target is None:
        serving_url = DEFAULT_SERVING_URL
    try:
        config = WebConfig(serving_url=serving_url, grpc_target=grpc_target, model_name=model_name, host=host,
                           port=port, feedback_dir=feedback_dir, model_dir=model_dir, model_timeout_s=model_timeout,
                           max_image_bytes=max_image_bytes, model_connections=model_connections,
                           predicts_per_minute=predicts_per_minute, feedback_per_minute=feedback_per_minute,
                           allowed_hosts=allowed_hosts, allowed_origins=allowed_origins, max_pending=max_pending,
                           pending_per_client=pending_per_client, form_path=form_path,
                           sheets_per_minute=sheets_per_minute, max_pending_sheets=max_pending_sheets,
                           pending_sheets_per_client=pending_sheets_per_client,
                           review_token=_review_token(review_token_file))
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if config.feedback_dir.exists() and not config.feedback_dir.is_dir():
        raise click.ClickException(f"--feedback-dir {config.feedback_dir} exists and is not a directory")
    if config.model_dir is not None and not config.model_dir.is_dir():
        raise click.ClickException(f"--model-dir {config.model_dir} is not a directory: give the model server's "
                                   "base path (e.g. serving_model/digits), or leave the option out")
    if config.form_path is not None:
        _check_form(config.form_path)
    # The port before anything else, so a taken one is one line; bound, not listening until the app is.
    try:
        sock = reserve(Port(config.host, config.port, "the web page", "--port"))
    except PortError as error:
        raise click.ClickException(str(error)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from web.app import serve

    def ready(bound_port: int) -> None:
        click.echo(f"web app for {config.model_name} on http://{config.host}:{bound_port}/ "
                   f"(model server: {config.model_server}; corrections: {config.feedback_dir})")
        if config.review_token is not None:
            click.echo(f"review page: http://{config.host}:{bound_port}/review (give it the review token)")
        click.echo("ready (Ctrl-C or SIGTERM to stop)")
        sys.stdout.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Both stop it, also when started with SIGINT ignored (a background job of a script).
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, on_ready=ready, stop=stop, sock=sock)

    try:
        asyncio.run(main())
    except OSError as error:  # listening failed after all (another process bound the port meanwhile)
        raise click.ClickException(f"cannot listen on {config.host}:{config.port}: {error.strerror or error}") \
            from None
    finally:
        sock.close()
    click.echo("stopped")


def _review_token(path: Path | None) -> str | None:
    """The reviewers' token from --review-token-file, else from DIGITS_REVIEW_TOKEN, else None."""
    if path is None:
        return os.environ.get(REVIEW_TOKEN_ENV) or None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise click.ClickException(f"cannot read --review-token-file {path}: {error}") from None
    if not token:
        raise click.ClickException(f"--review-token-file {path} is empty")
    return token


def _check_form(path: Path) -> None:
    """A form description that cannot be read is one line now, not a refused sheet later."""
    from forms import layout

    try:
        layout.load(path)
    except layout.FormError as error:
        raise click.ClickException(f"--form {error}") from None
