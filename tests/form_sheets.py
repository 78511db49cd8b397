"""A small form and photos of it filled in, for the tests of `digits read` and of the web app's sheet
endpoint (the `sevens_server` and `form_file` fixtures in conftest.py serve and describe it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORM_YAML = """
name: ballot-account
title: Ballot account
frame: {width: 120, height: 90}
box: {width: 12, height: 15}
counts:
  - {id: issued, label: "Ballots issued", digits: 3, at: [70, 25]}
  - {id: counted, label: "Ballots counted", digits: 3, at: [70, 55]}
checks:
  - {name: "every ballot issued is counted", sum: [counted], equals: issued}
"""


def photo(form_file: Path, values: dict, directory: Path, name: str, turned: bool = False, seed: int = 0) -> Path:
    """A filled sheet photographed a little skewed, in perspective, blurred and as JPEG (or upside down)."""
    import cv2

    from forms import layout, synth

    form = layout.load(form_file)
    rng = np.random.default_rng(seed)
    sheet = synth.fill_sheet(form, values, rng)
    knobs = synth.Degradation(skew_deg=2.5, perspective=0.015, light=0.3, noise=4, blur=0.8, jpeg_quality=70,
                              scale=0.8, turned=turned)
    path = directory / f"{name}.jpg"
    cv2.imwrite(str(path), synth.photo_sheet(sheet, rng, knobs).image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path
