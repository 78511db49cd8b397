"""Encodes the contract's tf.train.Example (image bytes + int64 label) without TensorFlow.

Importing TensorFlow costs ~20 s of CPU here, more than building the whole embedded
dataset, so the builder writes the protobuf wire format of this one fixed message
shape itself. The tests check the bytes against TensorFlow's own `tf.train.Example`.
"""

from __future__ import annotations

from data import contract


def _varint_slow(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS: list[bytes] = []  # varints of 0..16383 (every length a digit PNG has), made on first use


def _varint(value: int) -> bytes:
    if value < 16384:
        if not _SMALL_VARINTS:
            _SMALL_VARINTS.extend(_varint_slow(n) for n in range(16384))
        return _SMALL_VARINTS[value]
    return _varint_slow(value)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int64_feature(value: int) -> bytes:
    # Feature.int64_list (3) -> Int64List.value (1, packed); negatives are 10-byte varints.
    return _field(3, _field(1, _varint(value & 0xFFFFFFFFFFFFFFFF)))


# Example.features (1) -> Features.feature (1): map<string, Feature> entries {1: key, 2: value}.
_IMAGE_KEY_FIELD = _field(1, contract.IMAGE_KEY.encode())
_LABEL_ENTRIES = {}  # label -> the whole serialized map entry, built on first use


def _label_entry(label: int) -> bytes:
    entry = _LABEL_ENTRIES.get(label)
    if entry is None:
        entry = _field(1, _field(1, contract.LABEL_KEY.encode()) + _field(2, _int64_feature(label)))
        _LABEL_ENTRIES[label] = entry
    return entry


def encode_example(image: bytes, label: int) -> bytes:
    """Serialized tf.train.Example {image: bytes_list[image], label: int64_list[label]}.

    Byte-for-byte what `tf.train.Example.SerializeToString(deterministic=True)` gives.
    """
    # Feature.bytes_list (1) -> BytesList.value (1). Lengths are computed inside out.
    image_len = _varint(len(image))
    bytes_list_len = 1 + len(image_len) + len(image)
    bytes_list_len_v = _varint(bytes_list_len)
    feature_len = 1 + len(bytes_list_len_v) + bytes_list_len
    feature_len_v = _varint(feature_len)
    entry_len = len(_IMAGE_KEY_FIELD) + 1 + len(feature_len_v) + feature_len
    entry_len_v = _varint(entry_len)
    label_entry = _label_entry(label)
    features_len = 1 + len(entry_len_v) + entry_len + len(label_entry)
    return b"".join(
        (
            b"\x0a", _varint(features_len),  # Example.features
            b"\x0a", entry_len_v, _IMAGE_KEY_FIELD,  # map entry, key "image"
            b"\x12", feature_len_v,  # map entry value: Feature
            b"\x0a", bytes_list_len_v,  # Feature.bytes_list
            b"\x0a", image_len, image,  # BytesList.value
            label_entry,
        )
    )
