"""The pipeline image's targets and their tags (docker/pipeline/Dockerfile): one fact, one place.

    docker build -f docker/pipeline/Dockerfile                   -t REPO:TAG            .   # every component
    docker build -f docker/pipeline/Dockerfile --target dataflow -t REPO:TAG-dataflow   .   # Dataflow's workers
    docker build -f docker/pipeline/Dockerfile --target gpu      -t REPO:TAG-gpu        .   # a GPU Trainer

Given `--image REPO:TAG`, the compile finds the others by that tag convention. An image pinned by
digest names exactly one image, so its variants cannot be derived and must be named.
"""

from __future__ import annotations

DATAFLOW_SUFFIX = "-dataflow"
GPU_SUFFIX = "-gpu"


class ImageError(ValueError):
    """A variant of the image that cannot be derived; one line naming the option that gives it."""


def variant(image: str, suffix: str, option: str) -> str:
    """REPO:TAG -> REPO:TAG<suffix> (an image already so tagged is itself)."""
    name, _, tag = image.rpartition(":")
    if "@" in image or not name or "/" in tag:
        raise ImageError(f"cannot derive the {suffix.lstrip('-')} variant (tagged TAG{suffix}) of {image!r}: "
                         f"give it with {option}")
    return image if tag.endswith(suffix) else f"{name}:{tag}{suffix}"
