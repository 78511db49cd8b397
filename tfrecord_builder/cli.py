"""`digits data build`: the command-line face of the TFRecord builder."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from tfrecord_builder.config import BuildConfig


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@click.command("build")
@click.argument("source", type=click.Path(path_type=Path), default=Path("data/mnist-png"))
@click.option("--out", "output", type=click.Path(path_type=Path), default=Path("data/tfrecords"), show_default=True,
              help="Output directory: train/, eval/, test/ shards, manifest.json, rejects.jsonl.")
@click.option("--eval-fraction", type=float, default=0.1, show_default=True,
              help="Share of each class of training/ that goes to the eval split.")
@click.option("--per-class", type=int, default=None, help="Keep N files per class of training/ (balanced subsample).")
@click.option("--test-per-class", type=int, default=None, help="Keep N files per class of testing/.")
@click.option("--shards", type=int, default=None, help="Shards per split [default: one per 10,000 examples].")
@click.option("--workers", type=int, default=None, help="Worker processes [default: one per core].")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the split, subsample and shuffle.")
@click.option("--expected-size", default="28", show_default=True,
              help="Required width and height in pixels, or 'any'.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--if-changed", is_flag=True,
              help="Keep an existing output that an earlier --if-changed build made from the same tree and "
                   "options; rebuild it otherwise.")
@click.option("--extra-source", "extra_sources", multiple=True, type=click.Path(path_type=Path),
              help="Another tree whose training/<digit>/*.png all go to the train split (never eval or test; "
                   "not limited by --per-class): the corrections `digits web` stores, of which training/ holds "
                   "the reviewed and accepted ones only (pending/ and rejected/ are counted, never used). "
                   "Repeatable.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary table.")
def build_command(source, output, eval_fraction, per_class, test_per_class, shards, workers, seed, expected_size,
                  overwrite, if_changed, extra_sources, quiet):
    """Build GZIP TFRecord shards (image PNG bytes + label) from a mnist-png tree, MNIST's IDX files or a Kaggle CSV.

    SOURCE is ROOT of ROOT/training/<digit>/*.png and ROOT/testing/<digit>/*.png
    [default: data/mnist-png]; or a directory holding train-images-idx3-ubyte[.gz],
    train-labels-idx1-ubyte[.gz] and their t10k-* pair; or a labelled Kaggle
    train.csv (every 7th row is the test split). Every file or record ends up
    written or listed, with a reason, in OUT/rejects.jsonl.
    """
    from rich.console import Console

    from tfrecord_builder import report
    from tfrecord_builder.builder import BuildError, build

    console = Console(stderr=True, quiet=quiet)
    try:
        size = None if expected_size.lower() == "any" else int(expected_size)
    except ValueError:
        raise click.BadParameter(
            f"{expected_size!r} is not a number of pixels or 'any'", param_hint="'--expected-size'"
        ) from None
    try:
        config = BuildConfig(
            source=source, output=output, eval_fraction=eval_fraction, per_class=per_class,
            test_per_class=test_per_class, shards=shards, workers=workers, seed=seed,
            expected_size=size, overwrite=overwrite, if_changed=if_changed, extra_sources=extra_sources,
        )
    except ValueError as error:
        raise click.BadParameter(str(error)) from None

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with report.progress_bar(console) as on_progress:
            result = build(config, on_progress=on_progress)
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written (any previous output is unchanged)", err=True)
        sys.exit(130)
    except BuildError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.up_to_date:
        if not quiet:
            click.echo(f"{output} is up to date ({result.manifest['counts']['written']:,} examples); nothing to do")
        return
    if not quiet:
        report.print_summary(Console(), result)
