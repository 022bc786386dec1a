"""Writers: shard function, CSV-ZIP and TFRecord layout, info.json, round trips, failures."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest

from segclr_beam.aggregate import AggregateEmbeddings
from segclr_beam.outputs import CoordinateSystem, WriteEmbeddings, csv_rows, tfrecord_name
from segclr_beam.reader import EmbeddingReader
from segclr_beam.records import EmbeddingTable, Point, output_variants
from segclr_beam.shards import TEMP_PREFIX, shard_of

RESOLUTION = (32.0, 32.0, 40.0)
DIM = 8
SEGMENTS = [864691135591041291, 864691135591041292, 864691134928303015, 7, 123456, 2 ** 40 + 3,
            99, 5000, 864691135000000001]
VARIANTS = output_variants([10000.0])


def make_records(seed: int = 0, segments=SEGMENTS, dim: int = DIM) -> list:
    rng = np.random.default_rng(seed)
    records = []
    for k, segment_id in enumerate(segments):
        n = [1, 40, 17, 3, 60, 2, 25, 9, 30][k % 9]
        voxels = rng.choice(600 ** 2, n, replace=False)  # distinct positions per segment
        xyz = np.stack([voxels % 600 + 1000, voxels // 600 + 2000, np.full(n, 300 + k)], 1)
        scale = 10.0 ** rng.integers(-6, 6, (n, dim))
        embeddings = (rng.standard_normal((n, dim)) * scale).astype(np.float32)
        records += [(Point(segment_id, node, *map(int, xyz[node])), embeddings[node])
                    for node in range(n)]
    return records


def write(records, out: str, *, variants=VARIANTS, aggregate=True, **options) -> None:
    options = {"coordinates": CoordinateSystem.microns_public(RESOLUTION), "num_shards": 50000,
               "bytewidth": 8, "embedding_dim": DIM, "tfrecord_shards": 3,
               "volumes": {"em": "gs://em", "seg": "s"},
               "model": {"name": "segclr"}, **options}
    with beam.Pipeline(runner="FnApiRunner") as p:
        raw = p | beam.Create(records, reshuffle=False)
        inputs = {"raw": raw}
        if aggregate:
            inputs.update(raw | AggregateEmbeddings(RESOLUTION, (10000.0,)))
        inputs | WriteEmbeddings(out, variants, **options)


def by_node(records) -> dict:
    return {(p.segment_id, p.node_id): (p, e) for p, e in records}


def tree_bytes(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One run with both formats, gzip TFRecords, a raw and an aggregated tree."""
    out = tmp_path_factory.mktemp("out") / "embeddings"
    records = make_records()
    write(records, str(out), tfrecord_gzip=True)
    return out, records


def test_variant_names():
    assert output_variants((10000, 25000.0)) == {"raw": None, "agg10um": 10000.0,
                                                 "agg25um": 25000.0}
    assert output_variants((12500.0,), raw=False) == {"agg12500nm": 12500.0}


def test_csv_floats_are_shortest_float32_round_trip():
    rng = np.random.default_rng(3)
    values = np.concatenate([
        (rng.standard_normal(4000) * 10.0 ** rng.integers(-40, 38, 4000)).astype(np.float32),
        np.array([0.0, -0.0, 1.0, 0.1, 1e-45, -1.4e-45, 1.1754944e-38, 3.4028235e38,
                  -3.4028235e38, 16777217.0, 1e16, 1e-5], np.float32)])
    values = values[np.isfinite(values)].reshape(-1, 4)
    n = len(values)
    table = EmbeddingTable(np.zeros(n, np.uint64), np.arange(n), np.zeros((n, 3), np.int64),
                           values)
    text = "".join(csv_rows(table, CoordinateSystem.voxels(RESOLUTION)))
    fields = [line.split(",")[4:] for line in text.splitlines()]
    parsed = np.array([[float(f) for f in row] for row in fields]).astype(np.float32)
    np.testing.assert_array_equal(parsed.view(np.uint32), values.view(np.uint32))
    # Shortest: one significant digit fewer no longer parses back to the same float32.
    for row, strings in zip(values, fields):
        for value, s in zip(row, strings):
            digits = len(s.split("e")[0].replace("-", "").replace(".", "").strip("0"))
            if digits > 1:
                assert np.float32(float(f"{value:.{digits - 2}e}")) != value, s


def test_csv_zip_layout(written):
    out, records = written
    expected = by_node(records)
    segments = sorted({p.segment_id for p, _ in records})
    zips = sorted(os.listdir(out / "raw"))
    shards = {shard_of(s, 50000, 8) for s in segments}
    assert [z for z in zips if z.endswith(".zip")] == sorted(f"{s}.zip" for s in shards)
    seen = set()
    for shard in shards:
        with zipfile.ZipFile(out / "raw" / f"{shard}.zip") as archive:
            members = archive.infolist()
            assert [m.filename for m in members] == sorted(
                (f"{s}.csv" for s in segments if shard_of(s, 50000, 8) == shard),
                key=lambda name: int(name[:-4]))
            for member in members:
                assert member.compress_type == zipfile.ZIP_DEFLATED
                assert member.date_time == (1980, 1, 1, 0, 0, 0)
                segment_id = int(member.filename[:-4])
                text = archive.read(member).decode("ascii")
                assert text.endswith("\n") and not text.startswith("node")
                rows = [line.split(",") for line in text[:-1].split("\n")]
                assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
                xyz = [tuple(r[1:4]) for r in rows]
                assert len(set(xyz)) == len(xyz)  # rows unique per x, y, z
                for r in rows:
                    assert len(r) == 4 + DIM
                    point, embedding = expected[segment_id, int(r[0])]
                    nm = np.array(point[2:]) * RESOLUTION + (110592, 110592, 592640)
                    assert [float(v) for v in r[1:4]] == nm.tolist()
                    assert r[1] == str(int(nm[0]))  # integral nm written without a fraction
                    np.testing.assert_array_equal(np.array(r[4:], float).astype(np.float32),
                                                  embedding)
                    seen.add((segment_id, int(r[0])))
    assert seen == set(expected)


def test_reader_round_trip_is_exact(written):
    out, records = written
    expected = by_node(records)
    reader = EmbeddingReader(str(out / "raw"))
    segments = sorted({p.segment_id for p, _ in records})
    for segment_id in segments:
        segment = reader.read_segment(segment_id)
        assert segment.embeddings.dtype == np.float32
        want = [expected[segment_id, n] for n in segment.node_ids.tolist()]
        assert sorted(segment.node_ids.tolist()) == sorted(n for s, n in expected
                                                           if s == segment_id)
        np.testing.assert_array_equal(reader.coordinates.to_voxels(segment.xyz),
                                      [p[2:] for p, _ in want])
        np.testing.assert_array_equal(segment.embeddings.view(np.uint32),
                                      np.stack([e for _, e in want]).view(np.uint32))
    assert sorted(s.segment_id for s in reader) == segments
    assert sum(len(s) for s in reader) == len(records)
    with pytest.raises(KeyError, match="segment 8 is not in"):
        reader.read_segment(8)


def test_info_json(written):
    out, records = written
    for variant, radius in VARIANTS.items():
        info = json.loads((out / variant / "info.json").read_text())
        assert info["variant"] == variant and info["aggregation_radius_nm"] == radius
        assert info["format_version"] == 1 and info["embedding_dim"] == DIM
        assert (info["num_shards"], info["bytewidth"]) == (50000, 8)
        assert info["coordinates"] == {"unit": "nm", "resolution_nm": list(RESOLUTION),
                                       "offset_nm": [110592.0, 110592.0, 592640.0]}
        assert info["volumes"] == {"em": "gs://em", "seg": "s"}
        assert info["model"] == {"name": "segclr"}
        assert info["segments"] == len(SEGMENTS) and info["nodes"] == len(records)
        assert info["csv_zip"]["count"] == len({shard_of(s, 50000, 8) for s in SEGMENTS})
        assert info["tfrecord"]["files"] == "embeddings-SSSSS-of-00003.tfrecord.gz"
    assert sorted(p.name for p in out.iterdir()) == ["agg10um", "raw"]  # no temporary left


def test_tfrecords_parse_with_tensorflow(written):
    import tensorflow as tf

    out, records = written
    expected = by_node(records)
    agg = EmbeddingReader(str(out / "agg10um"))
    for variant, radius in VARIANTS.items():
        features = {"skeleton_id": tf.io.FixedLenFeature([1], tf.int64),
                    "node_id": tf.io.FixedLenFeature([1], tf.int64),
                    "center": tf.io.FixedLenFeature([3], tf.int64),
                    "embeddings": tf.io.FixedLenFeature([DIM], tf.float32)}
        if radius is not None:
            features["aggregation_radius_nm"] = tf.io.FixedLenFeature([1], tf.float32)
        seen = []
        for shard in range(3):
            path = out / variant / tfrecord_name("embeddings", shard, 3, gzip=True)
            for raw in tf.data.TFRecordDataset(str(path), compression_type="GZIP"):
                example = {k: v.numpy() for k, v in
                           tf.io.parse_single_example(raw, features).items()}
                segment_id, node_id = int(example["skeleton_id"][0]), int(example["node_id"][0])
                assert shard_of(segment_id, 3, 8) == shard
                point, embedding = expected[segment_id, node_id]
                np.testing.assert_array_equal(example["center"], point[2:])
                if radius is None:
                    np.testing.assert_array_equal(example["embeddings"], embedding)
                else:
                    assert example["aggregation_radius_nm"][0] == radius
                    segment = agg.read_segment(segment_id)
                    row = np.flatnonzero(segment.node_ids == node_id)[0]
                    np.testing.assert_array_equal(example["embeddings"], segment.embeddings[row])
                seen.append((segment_id, node_id))
        assert seen == sorted(seen, key=lambda k: (shard_of(k[0], 3, 8), k))
        assert set(seen) == set(expected) and len(seen) == len(expected)


@pytest.mark.parametrize("num_shards, bytewidth, coordinates", [
    (10000, 64, CoordinateSystem.voxels(RESOLUTION)),
    (50000, 8, CoordinateSystem.nanometres((8.0, 8.0, 40.0))),
])
def test_both_sharding_settings_round_trip(tmp_path, num_shards, bytewidth, coordinates):
    records = make_records(seed=1)
    write(records, str(tmp_path / "out"), variants={"raw": None}, aggregate=False,
          formats=("csv_zip",), num_shards=num_shards, bytewidth=bytewidth,
          coordinates=coordinates)
    tree = tmp_path / "out" / "raw"
    for segment_id in SEGMENTS:
        with zipfile.ZipFile(tree / f"{shard_of(segment_id, num_shards, bytewidth)}.zip") as z:
            assert f"{segment_id}.csv" in z.namelist()
    # A public release has no info.json: the reader needs the sharding settings.
    release = tmp_path / "release"
    shutil.copytree(tree, release, ignore=shutil.ignore_patterns("info.json"))
    with pytest.raises(ValueError, match="give its num_shards and bytewidth"):
        EmbeddingReader(str(release))
    expected = by_node(records)
    for reader in (EmbeddingReader(str(tree)),
                   EmbeddingReader(str(release), num_shards=num_shards, bytewidth=bytewidth)):
        for segment_id in SEGMENTS:
            segment = reader.read_segment(segment_id)
            points = [expected[segment_id, n][0] for n in segment.node_ids.tolist()]
            np.testing.assert_array_equal(coordinates.to_voxels(segment.xyz),
                                          [p[2:] for p in points])
            np.testing.assert_array_equal(
                segment.embeddings,
                np.stack([expected[segment_id, n][1] for n in segment.node_ids.tolist()]))
    with pytest.raises(ValueError, match="contradicts"):
        EmbeddingReader(str(tree), num_shards=num_shards + 1)


def test_rerun_gives_identical_bytes(written, tmp_path):
    out, records = written
    again = tmp_path / "again"
    shuffled = [records[k] for k in np.random.default_rng(5).permutation(len(records))]
    write(shuffled, str(again), tfrecord_gzip=True)
    assert tree_bytes(again) == tree_bytes(out)
    # Into the same tree, over an earlier run with another shard count: stale shards go.
    write(records, str(again), num_shards=7, tfrecord_shards=2, tfrecord_gzip=True)
    write(records, str(again), tfrecord_gzip=True)
    assert tree_bytes(again) == tree_bytes(out)


def test_gcs_gives_the_same_bytes(written, gcs):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    out, records = written
    write(records, f"gs://{gcs.bucket}/run/embeddings", tfrecord_gzip=True)
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    prefix = "run/embeddings/"
    remote = {blob.name[len(prefix):]: blob.download_as_bytes()
              for blob in client.list_blobs(gcs.bucket, prefix=prefix)}
    assert remote == tree_bytes(out)
    segment = EmbeddingReader(f"gs://{gcs.bucket}/run/embeddings/raw").read_segment(SEGMENTS[0])
    assert len(segment) == sum(p.segment_id == SEGMENTS[0] for p, _ in records)


@pytest.mark.parametrize("options, message", [
    ({"num_shards": 0}, "num_shards: must be an integer >= 1"),
    ({"bytewidth": 0}, "bytewidth: must be an integer >= 1"),
    ({"embedding_dim": 0}, "embedding_dim must be an integer >= 1"),
    ({"formats": ("csv",)}, "formats must be distinct names"),
    ({"tfrecord_shards": 100000}, "tfrecord_shards"),
    ({"coordinates": (32, 32, 40)}, "coordinates must be a CoordinateSystem"),
    ({"model": object()}, "JSON-serialisable"),
])
def test_bad_options_fail_at_construction(tmp_path, options, message):
    options = {"coordinates": CoordinateSystem.voxels(RESOLUTION), "num_shards": 10,
               "bytewidth": 8, "embedding_dim": DIM, **options}
    with pytest.raises(ValueError, match=message):
        WriteEmbeddings(str(tmp_path / "out"), {"raw": None}, **options)
    assert not (tmp_path / "out").exists()


def test_bad_coordinates():
    with pytest.raises(ValueError, match="offset applies only to nm"):
        CoordinateSystem("voxel", RESOLUTION, (1, 0, 0))
    with pytest.raises(ValueError, match="resolution_nm must be positive"):
        CoordinateSystem.nanometres((0, 32, 40))


def _nan(records):
    point, embedding = records[5]
    records[5] = (point, np.where(np.arange(DIM) == 2, np.nan, embedding).astype(np.float32))
    return f"segment {point.segment_id} node {point.node_id} has NaN or infinite"


def _inf(records):
    point, embedding = records[-1]
    records[-1] = (point, np.full(DIM, np.inf, np.float32))
    return f"segment {point.segment_id} node {point.node_id} has NaN or infinite"


def _duplicate_node(records):
    point, embedding = records[3]
    records.append((point._replace(x=point.x + 1), embedding))
    return f"duplicate node id {point.node_id} in segment {point.segment_id}"


def _duplicate_position(records):
    point, embedding = records[3]
    records.append((point._replace(node_id=1000), embedding))
    return f"nodes {point.node_id} and 1000 of segment {point.segment_id} share the position"


def _too_wide(records):
    records.append((Point(2 ** 64 + 5, 0, 1, 2, 3), np.zeros(DIM, np.float32)))
    return r"segment id 18446744073709551621 does not fit in bytewidth=8"


def _other_dim(records):
    records.append((Point(31, 0, 1, 2, 3), np.zeros(DIM + 1, np.float32)))
    return rf"raw: embedding of segment 31 node 0 has shape \(9,\), expected \({DIM},\)"


@pytest.mark.parametrize("corrupt", [_nan, _inf, _duplicate_node, _duplicate_position, _too_wide,
                                     _other_dim])
def test_bad_data_fails_without_output(tmp_path, corrupt):
    records = make_records(seed=2)
    message = corrupt(records)
    out = tmp_path / "out"
    with pytest.raises(Exception, match=message):
        write(records, str(out), variants={"raw": None}, aggregate=False)
    written = [p.relative_to(out) for p in out.rglob("*") if p.is_file()] if out.exists() else []
    if corrupt in (_duplicate_node, _duplicate_position):
        # Found while shards are written: other shards may be left in the run's staging
        # directory, never in the tree.
        written = [p for p in written if not p.parts[0].startswith(TEMP_PREFIX)]
    assert not written
