"""Which weights the InceptionV3 base starts from, and a record of that choice.

`auto` uses ImageNet weights when they are already in the Keras cache and
otherwise random initialisation,
with a loud warning that also goes into the run report; it never touches the
network. `imagenet` insists on them (Keras downloads them if it must), `none`
is random initialisation, and a path loads that file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

# The file tf_keras' InceptionV3(include_top=False, weights="imagenet") downloads and caches.
IMAGENET_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseWeights:
    keras_weights: str | None  # what InceptionV3(weights=...) gets: "imagenet", a path, or None
    source: str  # for people: where they came from
    pretrained: bool
    warning: str | None = None


def keras_cache_file() -> Path:
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return keras_home / "models" / IMAGENET_NOTOP_FILE


def resolve(choice: str) -> BaseWeights:
    if choice == "none":
        return BaseWeights(None, "random initialisation (--base-weights none)", pretrained=False)
    if choice == "imagenet":
        return BaseWeights("imagenet", "ImageNet (Keras cache or download)", pretrained=True)
    if choice != "auto":
        path = Path(choice)
        if not path.is_file():
            raise ValueError(f"base weights file {choice!r} does not exist")
        return BaseWeights(str(path), f"file {path}", pretrained=True)

    cached = keras_cache_file()
    if cached.is_file():
        return BaseWeights(str(cached), f"ImageNet, from {cached}", pretrained=True)
    warning = (
        f"ImageNet weights for InceptionV3 are not in the Keras cache ({cached}); training from "
        "RANDOM initialisation. Expect lower accuracy and longer training. Pass "
        "--base-weights imagenet to download them, or --base-weights PATH to use a copy."
    )
    log.warning(warning)
    return BaseWeights(None, "random initialisation (auto: no ImageNet weights on disk)", False, warning)
