"""`digits read`: numbers on tally forms, a row of boxes or a number written freely, through the model server."""

from __future__ import annotations

import json
from pathlib import Path

import click

from serving.batching import BatchingConfig

DEFAULT_REST = "http://127.0.0.1:8501"


@click.command("read")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--form", "form_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A form description (YAML/JSON, e.g. forms/tally.yaml): read every count of each sheet and "
                   "check its arithmetic. Without it, each image is one number.")
@click.option("--free", is_flag=True, help="Without --form: the number is written without boxes.")
@click.option("--rest", "rest_url", default=None, help=f"REST base URL [default: {DEFAULT_REST}].")
@click.option("--grpc", "grpc_target", default=None, metavar="HOST:PORT", help="Use gRPC instead of REST.")
@click.option("--model-name", default="digits", show_default=True)
@click.option("--label", default=None, help="A version label, e.g. stable.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the server.")
@click.option("--batch-size", type=click.IntRange(min=1), default=BatchingConfig.max_batch_size, show_default=True,
              help="Cells per request: a sheet's cells go in as few requests as this allows.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document per image on stdout.")
@click.option("--marked", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write IMAGE.marked.png here: each box outlined, green when accepted, red for a person.")
def read_command(images, form_path, free, rest_url, grpc_target, model_name, label, timeout, batch_size, as_json,
                 marked):
    """Read handwritten numbers: every count of a tally form (--form), checking that the counts add up as
    the form says, or one number per image (a row of digit boxes, or --free).

    A sheet is accepted only when the model stood by every digit and every check holds; otherwise the
    boxes to look at are named, and readings that would satisfy every check are suggested, never applied.
    The exit status is 0 when every image was read (whatever the verdict), 1 when one could not be."""
    from forms import layout
    from forms.reader import ReadError, decode, read_number, read_sheet
    from serving.client import GrpcClient, RestClient, ServerError

    if rest_url and grpc_target:
        raise click.UsageError("give --rest or --grpc, not both")
    if free and form_path is not None:
        raise click.UsageError("--free is for a number on its own, not a form")
    try:
        form = layout.load(form_path) if form_path is not None else None
    except layout.FormError as error:
        raise click.ClickException(str(error)) from None
    client = (GrpcClient(grpc_target, model_name, timeout, batch_size) if grpc_target
              else RestClient(rest_url or DEFAULT_REST, model_name, timeout, batch_size))

    def predict(cells: list[bytes]):
        return client.predict(cells, label=label)

    failed = 0
    try:
        for path in images:
            try:
                pixels = decode(path.read_bytes())
                if form is not None:
                    result = read_sheet(pixels, form, predict)
                    _show_sheet(path, result, as_json)
                else:
                    result = read_number(pixels, predict, boxes=not free)
                    _show_number(path, result, as_json)
                if marked is not None:
                    _write_marked(marked, path, pixels, result.marks(), result.turned)
            except OSError as error:
                click.echo(f"error: {path}: {error.strerror or error}", err=True)
                failed += 1
            except ReadError as error:
                click.echo(f"error: {path}: {error}", err=True)
                failed += 1
    except ServerError as error:
        raise click.ClickException(f"the server refused: {error}") from None
    finally:
        if grpc_target:
            client.close()
    if failed:
        raise click.exceptions.Exit(1)


def _show_sheet(path: Path, result, as_json: bool) -> None:
    sheet = result.reading
    if as_json:
        click.echo(json.dumps({"image": str(path), "turned": result.turned, **sheet.to_dict()}))
        return
    verdict = ("accepted" if sheet.accepted else
               "NEEDS A PERSON: the counts do not add up" if sheet.inconsistent else "NEEDS A PERSON")
    turned = {90: " (the sheet lay on its side)", 180: " (the sheet was upside down)",
              270: " (the sheet lay on its side)"}.get(result.turned, "")
    click.echo(f"{path}: {verdict}{turned}")
    width = max(len(count.label) for count in sheet.counts.values())
    for count in sheet.counts.values():
        shown = "?" if count.value is None else str(count.value)
        note = "" if count.accepted else "   look at: " + "; ".join(count.problems)
        click.echo(f"  {count.label:<{width}}  {shown:>7}{note}")
    for check in sheet.checks:
        state = ("holds" if check.holds else "cannot be checked: a count is not read" if check.holds is None
                 else f"FAILS: {check.left} as summed, {check.right} as written")
        click.echo(f"  check: {check.name}: {state}")
    for number, suggestion in enumerate(sheet.suggestions, 1):
        changes = ", ".join(f"{sheet.counts[count_id].label} {after}" for count_id, (_, after)
                            in suggestion.changes.items())
        click.echo(f"  suggestion {number} (for a person to confirm, {suggestion.probability:.0%}): {changes}")


def _show_number(path: Path, result, as_json: bool) -> None:
    count = result.reading
    if as_json:
        click.echo(json.dumps({"image": str(path), "value": count.value, "accepted": count.accepted,
                               "problems": list(count.problems),
                               "review_boxes": [index + 1 for index in count.review_cells],
                               "digits": [cell.describe() for cell in count.cells]}))
        return
    shown = "?" if count.value is None else str(count.value)
    digits = " ".join("_" if cell.blank else cell.describe() for cell in count.cells)
    note = "" if count.accepted else "   NEEDS A PERSON: " + "; ".join(count.problems)
    click.echo(f"{path}: {shown}   [{digits}]{note}")


def _write_marked(directory: Path, path: Path, pixels, marks, turned: int) -> None:
    from forms.marking import marked_image

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{path.stem}.marked.png"
    marked_image(pixels, marks, turned).save(target)  # upright, as the person reads it
    click.echo(f"  marked: {target}", err=True)


@click.group("form")
def form_group():
    """Tally forms: print a blank form, or make an example of a filled one to try `digits read` on."""


def _load_form(path: Path):
    from forms import layout

    try:
        return layout.load(path)
    except layout.FormError as error:
        raise click.ClickException(str(error)) from None


@form_group.command("print")
@click.argument("form_path", metavar="FORM", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dpi", type=click.IntRange(min=100, max=600), default=300, show_default=True)
def print_command(form_path, output, dpi):
    """Write the blank FORM as OUTPUT (PNG, or PDF to print at its true size)."""
    from PIL import Image

    from forms.render import blank_form

    if output.suffix.lower() not in (".png", ".pdf"):
        raise click.UsageError(f"{output}: write a .png or a .pdf")
    form = _load_form(form_path)
    page = Image.fromarray(blank_form(form, px_per_mm=dpi / 25.4))
    page.save(output, resolution=dpi) if output.suffix.lower() == ".pdf" else page.save(output, dpi=(dpi, dpi))
    click.echo(f"{output}: {form.name}, {page.width}x{page.height} px at {dpi} dpi")


@form_group.command("example")
@click.argument("form_path", metavar="FORM", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--wrong-total", is_flag=True, help="Make one total not add up, as a hurried clerk might.")
def example_command(form_path, output, seed, wrong_total):
    """Write a photo of FORM filled in by hand as OUTPUT (JPEG or PNG): held-out digits of the embedded
    sample, never a training digit, photographed a little skewed, unevenly lit and compressed."""
    import numpy as np
    from PIL import Image

    from forms import synth

    if output.suffix.lower() not in (".jpg", ".jpeg", ".png"):
        raise click.UsageError(f"{output}: write a .jpg or a .png")
    form = _load_form(form_path)
    rng = np.random.default_rng(seed)
    values = synth.random_values(form, rng, wrong_total_share=1.0 if wrong_total else 0.0)
    knobs = synth.Degradation(skew_deg=float(rng.uniform(-3, 3)), perspective=0.01, light=0.3, noise=4.0, blur=0.6,
                              table=0.04)
    photo = synth.photo_sheet(synth.fill_sheet(form, values.values, rng), rng, knobs)
    Image.fromarray(photo.image).save(output, quality=90)
    written = ", ".join(f"{count.label} {values.values[count.id]}" for count in form.counts)
    planted = f" (does not add up: {values.inconsistent[0]})" if values.inconsistent else ""
    click.echo(f"{output}: {written}{planted}")
