"""The hand-written tf.train.Example encoder against TensorFlow's own protobuf."""

import pytest

from tfrecord_builder.example import encode_example


def _reference(image: bytes, label: int) -> bytes:
    import tensorflow as tf

    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
        )
    )
    return example.SerializeToString(deterministic=True)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16_383, 16_384, 2_100_000])
@pytest.mark.parametrize("label", [0, 7, 9, 127, 128, -1])
def test_encoding_is_byte_identical_to_tensorflow(size, label):
    image = bytes(i % 251 for i in range(size))
    assert encode_example(image, label) == _reference(image, label)


def test_real_png_round_trips_through_tf_parse(sample_tree):
    import tensorflow as tf

    png = next((sample_tree / "training" / "3").iterdir()).read_bytes()
    parsed = tf.io.parse_single_example(
        encode_example(png, 3),
        {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)},
    )
    assert parsed["image"].numpy() == png
    assert int(parsed["label"]) == 3
