"""Sharded files: the shard rule, the encodings, staging and an idempotent finalize, WriteShards."""

from __future__ import annotations

import os

import apache_beam as beam
import fastavro
import pytest
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from segclr_beam import shards

SCHEMA = fastavro.parse_schema({"type": "record", "name": "Row",
                                "fields": [{"name": "k", "type": "long"}]})


def test_shard_check_values_from_spec():
    assert shards.shard_of(864691135591041291, num_shards=50000, bytewidth=8) == 7443
    assert shards.shard_of(864691135591041291, num_shards=10000, bytewidth=64) == 885


def test_shard_rejects_ids_that_do_not_fit():
    with pytest.raises(ValueError, match=r"does not fit in bytewidth=4 bytes \(it needs 8\)"):
        shards.shard_of(864691135591041291, 100, 4)
    with pytest.raises(ValueError, match="negative"):
        shards.shard_of(-1, 100, 8)
    with pytest.raises(ValueError, match="num_shards: must be an integer >= 1"):
        shards.check_sharding(0, 8)


def test_tfrecord_framing_reads_back_with_tensorflow(tmp_path):
    records = [b"", b"x", bytes(range(256)) * 40, b"segclr" * 1000]
    path = tmp_path / "r.tfrecord"
    path.write_bytes(b"".join(shards.tfrecord(r) for r in records))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
    corrupt = bytearray(path.read_bytes())
    corrupt[20] ^= 1  # inside the second record's length: its CRC no longer matches
    path.write_bytes(bytes(corrupt))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(path)))


def test_avro_bytes_are_fixed_by_the_name():
    rows = [{"k": k} for k in range(1000)]
    a = shards.encode_avro(SCHEMA, rows, "segclr_beam.test")
    assert shards.encode_avro(SCHEMA, rows, "segclr_beam.test") == a
    assert shards.encode_avro(SCHEMA, rows, "segclr_beam.other") != a
    assert list(shards.read_avro(a)) == rows


def _stage(staging: shards.Staging, directory: str, names: list[str]) -> None:
    for name in names:
        shards.write_file(staging.temp_path(directory, name), name.encode())


def _tree(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_finalize_moves_everything_marker_last_and_is_idempotent(tmp_path):
    root = tmp_path / "out"
    os.makedirs(root / "a")
    (root / "a" / "old.zip").write_bytes(b"an earlier run's shard")
    (root / "a" / "notes.txt").write_bytes(b"not a shard file")
    (root / "a" / "info.json").write_bytes(b"an earlier run's marker")
    staging = shards.Staging.below(str(root))
    assert os.path.basename(staging.temp).startswith(shards.TEMP_PREFIX)
    _stage(staging, "a", ["0.zip", "1.zip"])
    _stage(staging, "b/c", ["0.avro"])
    files = {"a": ["0.zip", "1.zip"], "b/c": ["0.avro"]}
    markers = {"a/info.json": b"{}", "b/manifest.json": b"[]"}
    # A first attempt that died after moving one file, before anything else.
    FileSystems.rename([staging.temp_path("a", "0.zip")], [str(root / "a" / "0.zip")])
    paths = staging.finalize(files, markers, stale=("*.zip",))
    assert paths == [str(root / "a" / "info.json"), str(root / "b" / "manifest.json")]
    expected = {"a/0.zip": b"0.zip", "a/1.zip": b"1.zip", "a/notes.txt": b"not a shard file",
                "a/info.json": b"{}", "b/c/0.avro": b"0.avro", "b/manifest.json": b"[]"}
    assert _tree(root) == expected  # stale shard gone, temporary directory gone
    assert staging.finalize(files, markers, stale=("*.zip",)) == paths  # a retry after success
    assert _tree(root) == expected
    with pytest.raises(RuntimeError, match="files vanished before finalize"):
        staging.finalize({"a": ["2.zip"]}, markers)


def test_write_shards_on_the_local_runner_and_gcs(tmp_path, gcs):
    def run(root: str) -> list[str]:
        staging = shards.Staging.below(root)

        def write(shard, values):
            data = shards.encode_avro(SCHEMA, [{"k": v} for v in sorted(values)], "test")
            shards.write_file(staging.temp_path("", f"{shard}.avro"), data)
            return f"{shard}.avro"

        def finalize(names):
            return staging.finalize({"": sorted(names)}, {"done.json": b"{}"})

        with beam.Pipeline(runner="FnApiRunner") as p:
            _ = (p | beam.Create(range(100))
                 | shards.WriteShards(lambda v: [v % 3], write, finalize))
        return sorted(shards.list_names(root, "*"))

    local = str(tmp_path / "out")
    assert run(local) == ["0.avro", "1.avro", "2.avro", "done.json"]
    with open(os.path.join(local, "1.avro"), "rb") as f:
        assert [r["k"] for r in shards.read_avro(f)] == list(range(1, 100, 3))
    remote = f"gs://{gcs.bucket}/shards/out"
    assert run(remote) == run(local)
    for name in ("0.avro", "done.json"):
        with FileSystems.open(f"{remote}/{name}") as f, open(os.path.join(local, name), "rb") as g:
            assert f.read() == g.read()
    shards.delete_tree(remote)
    assert not shards.list_names(remote, "*")


def test_read_json_locally_and_on_gcs_whatever_the_name(tmp_path, gcs):
    for root in (str(tmp_path), f"gs://{gcs.bucket}/json"):
        for name in ("info.json", "info.json.gz"):  # a .gz name is not decompressed
            path = shards.join(root, name)
            shards.write_file(path, b'{"format": "x", "n": [1, 2]}')
            assert shards.read_json(path) == {"format": "x", "n": [1, 2]}
        shards.write_file(shards.join(root, "bad.json"), b'{"format": ')
        with pytest.raises(ValueError):
            shards.read_json(shards.join(root, "bad.json"))
        with pytest.raises(OSError):
            shards.read_json(shards.join(root, "absent.json"))
