"""`digits read` end to end: generated sheet photos, the real command, a real `digits serve` on loopback over
REST and gRPC, and the verdict the arithmetic gives.

The tiny test model answers one class for everything, so the server here serves a copy of it that
answers 7 for every image (tests/model_copies.py): what is under test is the reader's path, not the
model's reading. Which boxes hold ink decides every number (777 against 77), so a box cut from the wrong
place, a count fed another count's answers or a blank read as a digit changes the verdict. How well the
default model reads real sheets is benchmarks/tally_forms.py's question.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_digits
from form_sheets import FORM_YAML, photo

@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_planted_arithmetic_error_is_found_through_the_server(sevens_server, form_file, tmp_path, transport):
    consistent = photo(form_file, {"issued": 77, "counted": 77}, tmp_path, "consistent")
    planted = photo(form_file, {"issued": 777, "counted": 77}, tmp_path, "planted", turned=True, seed=1)
    target = ["--rest", sevens_server.rest_url] if transport == "rest" else ["--grpc", sevens_server.grpc_target]
    result = run_digits("read", "--form", form_file, consistent, planted, *target, "--json", "--marked", tmp_path)
    assert result.returncode == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())

    assert first["accepted"] is True and first["turned"] == 0
    assert {k: c["value"] for k, c in first["counts"].items()} == {"issued": 77, "counted": 77}
    assert first["counts"]["issued"]["boxes"][0] is None  # the empty hundreds box: a blank, not a 0
    assert [c["holds"] for c in first["checks"]] == [True]

    assert second["accepted"] is False and second["turned"] == 180
    assert {k: c["value"] for k, c in second["counts"].items()} == {"issued": 777, "counted": 77}
    assert second["checks"] == [{"name": "every ballot issued is counted", "equation": "counted = issued",
                                 "holds": False, "sum": 77, "total": 777}]
    assert second["suggestions"] == []  # every digit was accepted: the form itself does not add up


def test_the_verdict_for_a_person_and_the_marked_sheet(sevens_server, form_file, tmp_path):
    from PIL import Image

    planted = photo(form_file, {"issued": 777, "counted": 77}, tmp_path, "planted", seed=2)
    result = run_digits("read", "--form", form_file, planted, "--rest", sevens_server.rest_url, "--marked",
                        tmp_path / "marked")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{planted}: NEEDS A PERSON: the counts do not add up"
    assert lines[1].split() == ["Ballots", "issued", "777"] and lines[2].split() == ["Ballots", "counted", "77"]
    assert lines[3] == "  check: every ballot issued is counted: FAILS: 77 as summed, 777 as written"
    marked = np.asarray(Image.open(tmp_path / "marked" / "planted.marked.png").convert("RGB")).astype(int)
    red = (marked[..., 0] > 150) & (marked[..., 1] < 80) & (marked[..., 2] < 80)
    green = (marked[..., 1] > 100) & (marked[..., 0] < 60) & (marked[..., 2] < 90)
    # The counts of a failed check are outlined in red for the person; nothing is green.
    assert red.sum() > 500 and green.sum() == 0


def test_an_image_that_is_no_form_is_one_line_and_the_others_are_still_read(sevens_server, form_file, tmp_path):
    from PIL import Image

    good = photo(form_file, {"issued": 77, "counted": 77}, tmp_path, "good")
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 700), dtype=np.uint8)).save(noise)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    result = run_digits("read", "--form", form_file, noise, good, text, "--rest", sevens_server.rest_url)
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in result.stderr
    assert errors[0] == f"error: {noise}: not a form: no printed frame found"
    assert errors[1] == f"error: {text}: not an image (UnidentifiedImageError)"
    assert result.stdout.splitlines()[0] == f"{good}: accepted"


def test_a_server_that_is_not_there_is_one_line(form_file, tmp_path):
    good = photo(form_file, {"issued": 77, "counted": 77}, tmp_path, "good")
    result = run_digits("read", "--form", form_file, good, "--rest", "http://127.0.0.1:9")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("Error: the server refused: UNAVAILABLE")


def test_a_broken_form_description_is_one_line(tmp_path):
    broken = tmp_path / "form.yaml"
    broken.write_text(FORM_YAML.replace("digits: 3, at: [70, 55]", "digits: 3, at: [70, 30]"))
    result = run_digits("read", "--form", broken, tmp_path / "sheet.jpg")
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {broken}: form 'ballot-account': count 'counted': its boxes overlap " \
                                    "those of 'issued'"


def test_an_image_too_large_is_refused_before_it_is_decoded():
    import io

    from PIL import Image

    from forms.reader import MAX_PIXELS, ReadError, decode

    buffer = io.BytesIO()
    Image.new("L", (8000, 6000), 255).save(buffer, format="PNG")  # 48 MP of white: a 50 KB file
    with pytest.raises(ReadError, match=f"^8000x6000 pixels; at most {MAX_PIXELS // 10**6} megapixels$"):
        decode(buffer.getvalue())
    with pytest.raises(ReadError, match=r"^not an image \(UnidentifiedImageError\)$"):
        decode(b"%PDF-1.7 a scan as PDF")


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation():
    import io

    from PIL import Image

    from forms.reader import decode

    pixels = np.full((40, 60), 255, np.uint8)
    pixels[:10, :10] = 0  # a mark in the top-left corner of the upright picture
    stored = Image.fromarray(np.rot90(pixels, 1))  # stored turned a quarter left; orientation 6: turn it right
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = decode(buffer.getvalue())
    assert upright.shape == (40, 60) and upright[:10, :10].mean() < 60 and upright[-10:, -10:].mean() > 200


def test_digits_form_prints_the_blank_form_and_makes_an_example_that_reads_as_written(tmp_path):
    from PIL import Image

    from forms import geometry, layout

    tally = layout.Path(layout.__file__).with_name("tally.yaml")
    printed = run_digits("form", "print", tally, tmp_path / "blank.png", "--dpi", "150")
    assert printed.returncode == 0, printed.stderr
    blank = Image.open(tmp_path / "blank.png")
    assert blank.size == (1240, 1654) and round(blank.info["dpi"][0]) == 150  # 210 x 280 mm: frame + margins
    assert run_digits("form", "print", tally, tmp_path / "blank.pdf").returncode == 0
    assert (tmp_path / "blank.pdf").read_bytes().startswith(b"%PDF")

    made = run_digits("form", "example", tally, tmp_path / "sheet.jpg", "--seed", "3", "--wrong-total")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().endswith("(does not add up: valid votes and rejected ballots add up to the votes cast)")
    registered = geometry.register(np.asarray(Image.open(tmp_path / "sheet.jpg").convert("L")), layout.load(tally))
    assert registered.rotation == 0 and registered.matched == 1.0

    refused = run_digits("form", "print", tally, tmp_path / "blank.gif")
    assert refused.returncode == 2 and refused.stderr.startswith(f"Error: {tmp_path / 'blank.gif'}: write a .png")
    missing = run_digits("form", "example", tmp_path / "none.yaml", tmp_path / "sheet.png")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"Error: {tmp_path / 'none.yaml'}: no such form description"


def test_a_server_that_answers_fewer_images_than_it_was_sent_is_an_error_not_a_shifted_reading():
    from forms import layout, synth
    from forms.reader import read_sheet
    from serving.client import ServerError

    form = layout.tally_form()
    rng = np.random.default_rng(0)
    sheet = synth.fill_sheet(form, synth.random_values(form, rng).values, rng)
    with pytest.raises(ServerError, match=r"^BAD_ANSWER: \d+ answers for \d+ images$"):
        read_sheet(sheet.image, form, lambda cells: [])
