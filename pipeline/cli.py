"""The `digits` command: one entry point whose subcommands each live with the code they drive."""

from __future__ import annotations

import click

from data.cli import data_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="digits-mlops")
def main():
    """Handwritten-digit MLOps: data, TFX pipeline, serving and monitoring."""


main.add_command(data_group)

if __name__ == "__main__":
    main()
