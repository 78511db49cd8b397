"""GZIP TFRecord files written without TensorFlow are read by tf.data, and checked by our reader."""

import gzip
import hashlib

import pytest

from tfrecord_builder.tfrecord import CorruptRecord, GzipTFRecordWriter, read_records

RECORDS = [b"", b"a", bytes(range(256)) * 40, b"x" * 3_000_000]


def _write(path, records=RECORDS):
    with GzipTFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return writer


def test_tf_data_reads_every_record_back(tmp_path):
    import tensorflow as tf

    path = tmp_path / "r.tfrecord.gz"
    writer = _write(path)
    assert writer.records == len(RECORDS)
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(path), compression_type="GZIP")]
    assert read == RECORDS


def test_our_reader_agrees_and_same_records_give_same_bytes(tmp_path):
    first, second = _write(tmp_path / "a.gz"), _write(tmp_path / "b.gz")
    assert list(read_records(tmp_path / "a.gz")) == RECORDS
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    assert first.sha256 == second.sha256


def test_the_reported_hash_and_size_are_those_of_the_file_on_disk(tmp_path):
    """The manifest records what the writer reports: it must be the finished file, gzip trailer included."""
    writer = _write(tmp_path / "r.gz")
    on_disk = (tmp_path / "r.gz").read_bytes()
    assert writer.sha256 == hashlib.sha256(on_disk).hexdigest()
    assert writer.bytes_written == len(on_disk)


def test_flipped_byte_is_detected_by_crc(tmp_path):
    path = tmp_path / "r.gz"
    _write(path, [b"hello digits" * 10])
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[20] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(CorruptRecord, match="CRC"):
        list(read_records(path))


def test_failed_write_leaves_the_file_unfinished_not_silently_valid(tmp_path):
    path = tmp_path / "r.gz"
    with pytest.raises(RuntimeError):
        with GzipTFRecordWriter(path) as writer:
            writer.write(b"one")
            raise RuntimeError("boom")
    assert writer.sha256 == ""  # never reported as a finished shard
