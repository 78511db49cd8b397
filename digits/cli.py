"""The `digits` command: one entry point whose subcommands each live with the code they drive."""

from __future__ import annotations

import os
import sys
import warnings

import click

from data.cli import data_group
from digits.quiet import quiet_tensorflow_import
from forms.cli import form_group, read_command
from monitoring.cli import monitor_command
from pipeline.commands import pipeline_group
from serving.cli import predict_command, serve_command
from serving.docker_context import docker_group
from web.cli import web_command
from web.feedback_cli import feedback_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="digits-mlops")
def cli():
    """Handwritten-digit MLOps: data, TFX pipeline, serving, monitoring, the web app and the form reader."""


cli.add_command(data_group)
cli.add_command(pipeline_group)
cli.add_command(serve_command)
cli.add_command(predict_command)
cli.add_command(read_command)
cli.add_command(form_group)
cli.add_command(docker_group)
cli.add_command(monitor_command)
cli.add_command(web_command)
cli.add_command(feedback_group)


def main() -> None:
    # Keras 2 (tf_keras), as TFX 1.16, TFT and TFMA expect: decided before anything imports TensorFlow.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # google-api-core warns once per client library that Python 3.10 is old; TFX 1.16 needs 3.10.
    warnings.filterwarnings("ignore", message="You are using a non-supported Python version", category=FutureWarning)
    quiet_tensorflow_import()
    # Click's own handling prints a usage error as three lines (usage, a hint, the error); here every
    # error is one line, so that it is the first and only thing a person or a log reader has to read.
    try:
        code = cli.main(prog_name="digits", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:  # `digits pipeline` alone: its help, as click shows it
        error.show()
        sys.exit(error.exit_code)
    except click.ClickException as error:
        click.echo(one_line_error(error), err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # --help and --version end here with 0


def one_line_error(error: click.ClickException) -> str:
    """`Error: <message>`, and for a usage error where to find the right usage, on one line."""
    message = " ".join(error.format_message().split())
    if isinstance(error, click.UsageError) and error.ctx is not None:
        message += f" (see '{error.ctx.command_path} --help')"
    return f"Error: {message}"

