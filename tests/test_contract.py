"""The data contract is one leaf module every stage can import cheaply."""

import subprocess
import sys

from data import contract


def test_contract_values_match_the_design():
    assert (contract.IMAGE_KEY, contract.LABEL_KEY) == ("image", "label")
    assert contract.NUM_CLASSES == 10
    assert contract.CLASS_NAMES == tuple("0123456789")
    assert contract.IMAGE_SIZE == 75
    assert contract.IMAGE_CHANNELS == 3
    assert contract.VALUE_RANGE == (-1.0, 1.0)
    assert contract.SPLITS == ("train", "eval", "test")
    assert contract.SOURCE_DIRS == ("training", "testing")


def test_transformed_name_never_collides_with_raw_keys():
    assert contract.transformed_name(contract.IMAGE_KEY) == "image_xf"
    assert contract.transformed_name(contract.IMAGE_KEY) not in (contract.IMAGE_KEY, contract.LABEL_KEY)


def test_contract_and_builder_import_without_tensorflow():
    code = (
        "import sys, data.contract, tfrecord_builder.builder, tfrecord_builder.cli;"
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
