"""What the builder shows a person: a progress bar while it runs, a summary table after."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from data import contract
from tfrecord_builder.builder import BuildResult, ProgressCallback
from tfrecord_builder.manifest import REJECTS_NAME


@contextlib.contextmanager
def progress_bar(console: Console) -> Iterator[ProgressCallback | None]:
    """A live bar on a terminal; nothing in logs, where the summary says it all."""
    if not console.is_terminal or console.quiet:
        yield None
        return
    columns = (
        TextColumn("[bold]building TFRecords"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("build", total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def print_summary(console: Console, result: BuildResult) -> None:
    manifest = result.manifest
    counts = manifest["counts"]
    splits = manifest["splits"]
    table = Table(title=f"TFRecords written to {result.output}", title_justify="left")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    for name in contract.CLASS_NAMES:
        table.add_row(name, *(f"{info['per_class'][name]:,}" for info in splits.values()))
    table.add_section()
    table.add_row("total", *(f"{info['examples']:,}" for info in splits.values()), style="bold")
    table.add_row("shards", *(str(len(info["shards"])) for info in splits.values()))
    console.print(table)

    balance = f"seen {counts['seen']:,} = written {counts['written']:,} + rejected {counts['rejected']:,}"
    if counts["not_selected"]:
        balance += f" + not selected by --per-class {counts['not_selected']:,}"
    console.print(balance)
    for extra in manifest.get("extra_sources", []):
        review = extra.get("corrections", {})
        line = f"extra source {extra['path']}: {extra['training_files']:,} training digits added"
        if review.get("pending") or review.get("rejected"):
            line += (f"; not used: {review['pending']:,} corrections waiting for review, "
                     f"{review['rejected']:,} rejected (digits feedback review)")
        console.print(line)
    if counts["converted"]:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in manifest["converted"].items())
        console.print(f"converted to 8-bit grayscale: {kinds}")
    if counts["rejected"]:
        reasons = Table(title=f"rejected files (listed in {result.output / REJECTS_NAME})", title_justify="left")
        reasons.add_column("reason")
        reasons.add_column("files", justify="right")
        for reason, n in manifest["rejects"]["by_reason"].items():
            reasons.add_row(reason, f"{n:,}")
        console.print(reasons)
    rate = counts["seen"] / result.seconds if result.seconds else 0.0
    console.print(f"{result.seconds:.1f} s, {rate:,.0f} files/s; manifest: {result.output / 'manifest.json'}")
