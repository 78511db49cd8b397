"""Which weights the InceptionV3 base starts from, and a record of that choice.

`auto` uses ImageNet weights when they are already in the Keras cache and
otherwise random initialisation,
with a loud warning that also goes into the run report; it never touches the
network. `imagenet` insists on them (Keras downloads them if it must), `none`
is random initialisation, and a path loads that file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from components.config import TrainerConfig

# The file tf_keras' InceptionV3(include_top=False, weights="imagenet") downloads and caches.
IMAGENET_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseWeights:
    keras_weights: str | None  # what InceptionV3(weights=...) gets: "imagenet", a path, or None
    source: str  # for people: where they came from
    pretrained: bool
    warning: str | None = None
    sha256: str | None = None  # of the weights file, when it is one


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def keras_cache_file() -> Path:
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return keras_home / "models" / IMAGENET_NOTOP_FILE


def resolve(choice: str, quiet: bool = False) -> BaseWeights:
    if choice == "none":
        return BaseWeights(None, "random initialisation (--base-weights none)", pretrained=False)
    if choice == "imagenet":
        return BaseWeights("imagenet", "ImageNet (Keras cache or download)", pretrained=True)
    if choice != "auto":
        path = Path(choice)
        if not path.is_file():
            raise ValueError(f"base weights file {choice!r} does not exist")
        return BaseWeights(str(path), f"file {path}", pretrained=True, sha256=file_sha256(path))

    cached = keras_cache_file()
    if cached.is_file():
        return BaseWeights(str(cached), f"ImageNet, from {cached}", pretrained=True, sha256=file_sha256(cached))
    warning = (
        f"ImageNet weights for InceptionV3 are not in the Keras cache ({cached}); training from "
        "RANDOM initialisation. Expect lower accuracy and longer training. Pass "
        "--base-weights imagenet to download them, or --base-weights PATH to use a copy."
    )
    if not quiet:
        log.warning(warning)
    return BaseWeights(None, "random initialisation (auto: no ImageNet weights on disk)", False, warning)


def pin(config: TrainerConfig) -> TrainerConfig:
    """The training configuration with its base weights decided now, before the pipeline is built.

    The Trainer's custom_config is part of TFX's cache key. With `auto` in it, a run after ImageNet
    weights reached the Keras cache would be a cache hit that reuses the randomly initialised model;
    with the concrete choice and the file's hash in it, it is a new Trainer run. The Trainer checks
    the hash again (components/trainer.py), so a file changed in between is an error, not a surprise.
    """
    weights = resolve(config.base_weights, quiet=True)  # the CLI and the Trainer say it out loud
    concrete = "none" if weights.keras_weights is None else weights.keras_weights
    return dataclasses.replace(config, base_weights=concrete, base_weights_sha256=weights.sha256 or "",
                               base_weights_warning=weights.warning or config.base_weights_warning)


def resolve_pinned(config: TrainerConfig) -> BaseWeights:
    """In the Trainer: the pinned weights, refusing a file that is not the one the pipeline was built with."""
    weights = resolve(config.base_weights)
    if config.base_weights_sha256 and weights.sha256 != config.base_weights_sha256:
        raise ValueError(f"base weights file {config.base_weights} changed since the pipeline was built "
                         f"(sha256 {weights.sha256}, expected {config.base_weights_sha256})")
    return dataclasses.replace(weights, warning=config.base_weights_warning or weights.warning)
