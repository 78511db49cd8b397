"""The `digits` command: one entry point whose subcommands each live with the code they drive."""

from __future__ import annotations

import os
import warnings

import click

from data.cli import data_group
from monitoring.cli import monitor_command
from pipeline.commands import pipeline_group
from serving.cli import predict_command, serve_command
from serving.docker_context import docker_group
from web.cli import web_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="digits-mlops")
def cli():
    """Handwritten-digit MLOps: data, TFX pipeline, serving, monitoring and the web app."""


cli.add_command(data_group)
cli.add_command(pipeline_group)
cli.add_command(serve_command)
cli.add_command(predict_command)
cli.add_command(docker_group)
cli.add_command(monitor_command)
cli.add_command(web_command)


def main() -> None:
    # Keras 2 (tf_keras), as TFX 1.16, TFT and TFMA expect: decided before anything imports TensorFlow.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # google-api-core warns once per client library that Python 3.10 is old; TFX 1.16 needs 3.10.
    warnings.filterwarnings("ignore", message="You are using a non-supported Python version", category=FutureWarning)
    cli()

