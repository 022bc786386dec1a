"""Points sources and the points file: tables, precomputed skeletons, allow-lists, Avro, gs://."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import struct

import apache_beam as beam
import fastavro
import numpy as np
import pytest
import tensorstore as ts
from osteoid import Skeleton

from segclr_beam.points import (CheckPoints, PointsError, ReadPoints, WritePoints, read_points,
                                sample_nodes, shard_paths, write_avro)
from segclr_beam.precomputed import SkeletonError, skeletons_info, to_precomputed
from segclr_beam.records import Point

RESOLUTION = (32.0, 32.0, 33.0)


def through_beam(tmp_path, source: beam.PTransform, num_shards: int = 1) -> list[Point]:
    """Run `source` on the local runner, write its points as Avro and read them back."""
    path = str(tmp_path / "out" / "points.avro")
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = p | source | WritePoints(path, num_shards)
    return read_points(path if num_shards == 1 else path.replace(".avro", "-*.avro"))


def some_points(n=500, seed=0) -> list[Point]:
    rng = random.Random(seed)
    ids = [1, 2**63 - 1, 2**63, 2**64 - 1, 864691135591041291]
    return [Point(rng.choice(ids), i, rng.randint(-5, 10**6), rng.randint(0, 9), rng.randint(0, 9))
            for i in range(n)]


# The points file -----------------------------------------------------------------------------

def test_avro_round_trip_is_exact_and_bytes_do_not_depend_on_order(tmp_path):
    points = some_points()
    shuffled = points[::-1]
    random.Random(1).shuffle(shuffled)
    path = tmp_path / "points.avro"
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = p | beam.Create(shuffled) | WritePoints(str(path))
    assert read_points(str(path)) == sorted(points)
    direct = io.BytesIO()
    write_avro(direct, points)
    assert path.read_bytes() == direct.getvalue()
    with open(path, "rb") as f:  # a plain Avro file any reader opens
        records = list(fastavro.reader(f))
    assert records[0] == {"segment_id": 1, "node_id": records[0]["node_id"],
                          "x": records[0]["x"], "y": records[0]["y"], "z": records[0]["z"]}
    assert os.listdir(tmp_path) == ["points.avro"]  # the temporary directory is gone


def test_sharded_points_files(tmp_path):
    points = some_points()
    got = through_beam(tmp_path, beam.Create(points), num_shards=3)
    assert got == sorted(points)
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == [os.path.basename(p) for p in shard_paths("points.avro", 3)]
    assert written[0] == "points-00000-of-00003.avro"
    by_file = [{p.segment_id for p in read_points(str(tmp_path / "out" / f))} for f in written]
    assert sum(len(s) for s in by_file) == len(set.union(*by_file))  # a segment in one shard


def test_no_points_still_gives_readable_files(tmp_path):
    assert through_beam(tmp_path, beam.Create([]).with_output_types(Point), num_shards=2) == []
    assert len(os.listdir(tmp_path / "out")) == 2


# Tables --------------------------------------------------------------------------------------

def test_csv_without_node_ids_numbers_nodes_in_xyz_order(tmp_path):
    table = tmp_path / "points.csv"
    table.write_text("x,y,z,segment_id,note\n"
                     "5,0,0,18446744073709551615,a\n"
                     "1,9,9,18446744073709551615,b\n"
                     "1,2,3,7,c\n"
                     "\n"
                     "1,2,2.0,7,d\n")
    expected = [Point(7, 0, 1, 2, 2), Point(7, 1, 1, 2, 3),
                Point(2**64 - 1, 0, 1, 9, 9), Point(2**64 - 1, 1, 5, 0, 0)]
    assert read_points(str(table)) == expected
    assert through_beam(tmp_path, ReadPoints(str(table))) == expected


def test_tables_with_node_ids_are_taken_as_they_are(tmp_path):
    (tmp_path / "a.csv").write_text("segment_id,node_id,x,y,z\n3,10,1,1,1\n3,4,0,0,0\n")
    points = some_points(50)
    with open(tmp_path / "b.avro", "wb") as f:
        write_avro(f, points)
    expected = sorted(points + [Point(3, 10, 1, 1, 1), Point(3, 4, 0, 0, 0)])
    assert through_beam(tmp_path, ReadPoints(str(tmp_path / "*.*"))) == expected
    (tmp_path / "c.csv").write_text("segment_id,x,y,z\n3,1,1,1\n")
    with pytest.raises(PointsError, match="a.csv has a node_id column but .*c.csv has not"):
        ReadPoints(str(tmp_path / "*.*"))


def test_avro_table_without_node_ids(tmp_path):
    schema = {"type": "record", "name": "Row", "fields": [
        {"name": n, "type": "long"} for n in ("segment_id", "x", "y", "z")]}
    with open(tmp_path / "rows.avro", "wb") as f:
        fastavro.writer(f, schema, [{"segment_id": -1, "x": 3, "y": 0, "z": 0},
                                    {"segment_id": -1, "x": 1, "y": 0, "z": 0}])
    assert through_beam(tmp_path, ReadPoints(str(tmp_path / "rows.avro"))) == [
        Point(2**64 - 1, 0, 1, 0, 0), Point(2**64 - 1, 1, 3, 0, 0)]


def test_allow_list_restricts_tables(tmp_path):
    points = some_points()
    with open(tmp_path / "points.avro", "wb") as f:
        write_avro(f, points)
    allowed = {1, 2**64 - 1}
    got = through_beam(tmp_path, ReadPoints(str(tmp_path / "points.avro"), segment_ids=allowed))
    assert got == sorted(p for p in points if p.segment_id in allowed)


@pytest.mark.parametrize("rows, where, what", [
    ("1,2,3,4\n5,6,x7,8\n", ":3:", "x must be an integer, got 'x7'"),
    ("1,2,3,4\n5,6,7\n", ":3:", "3 fields, the header has 4"),
    ("1,2,3,4\n0,6,7,8\n", ":3:", "segment_id must be in 1"),
    ("1,2,3,4\n-5,6,7,8\n", ":3:", "segment_id must be in 1 .. 2**64-1, got -5"),
    ("1,2,3,4\n5,6,7.5,8\n", ":3:", "x must be an integer, got '7.5'"),
])
def test_unreadable_csv_names_the_file_and_line(tmp_path, rows, where, what):
    table = tmp_path / "bad.csv"
    table.write_text("segment_id,y,x,z\n" + rows)
    with pytest.raises(PointsError) as error:
        read_points(str(table))
    assert f"{table}{where} {what}" in str(error.value)
    with pytest.raises(Exception, match=f"{table}{where}"):  # Beam wraps worker errors
        through_beam(tmp_path, ReadPoints(str(table)))


@pytest.mark.parametrize("header, rows, message", [
    ("segment_id,x,y,z", "7,1,2,3\n8,1,2,3\n7,1,2,3\n",
     "a.csv:4: repeats segment 7 position (1, 2, 3) of {}a.csv:2"),
    ("segment_id,node_id,x,y,z", "7,0,1,2,3\n7,0,4,5,6\n",
     "a.csv:3: repeats segment 7 node id 0 of {}a.csv:2"),
])
def test_repeated_rows_are_named_by_file_and_line(tmp_path, header, rows, message):
    (tmp_path / "a.csv").write_text(f"{header}\n{rows}")
    expected = message.format(f"{tmp_path}/")
    with pytest.raises(PointsError, match=re.escape(expected)):
        read_points(str(tmp_path / "a.csv"))
    with pytest.raises(Exception, match=re.escape(expected)):
        through_beam(tmp_path, ReadPoints(str(tmp_path / "a.csv")))


def checked(tmp_path, points, segment_ids=None, bytewidth=8):
    with open(tmp_path / "points.avro", "wb") as f:
        write_avro(f, points)
    source = ReadPoints(str(tmp_path / "points.avro"))
    return through_beam(tmp_path, source | CheckPoints("the test's points", segment_ids,
                                                       bytewidth))


def test_points_pass_the_check_only_if_there_are_any_of_every_listed_segment(tmp_path):
    points = some_points(50)
    assert checked(tmp_path, points) == sorted(points)
    with pytest.raises(Exception, match=r"the test's points: no points, so nothing to embed"):
        checked(tmp_path, [])
    with pytest.raises(Exception, match=r"segments: 2 of the 3 listed segment ids have no point "
                                         r"in the test's points: 5, 6 "):
        checked(tmp_path, points, segment_ids=[1, 5, 6])


def test_ids_too_wide_for_the_shard_hash_are_refused_before_any_cutout(tmp_path):
    small = [Point(2**24 - 1, 0, 1, 2, 3)]
    assert checked(tmp_path, small, bytewidth=3) == small
    with pytest.raises(Exception, match=r"bytewidth: segment id 16777216 does not fit in "
                                         r"bytewidth=3 bytes"):
        checked(tmp_path, small + [Point(2**24, 0, 1, 2, 3)], bytewidth=3)


def test_bad_headers_and_files_are_refused_before_running(tmp_path):
    (tmp_path / "cols.csv").write_text("segment,x,y,z\n1,2,3,4\n")
    with pytest.raises(PointsError, match=r"cols.csv:1: missing column\(s\) segment_id"):
        ReadPoints(str(tmp_path / "cols.csv"))
    with pytest.raises(PointsError, match="no points table matches"):
        ReadPoints(str(tmp_path / "none-*.avro"))
    (tmp_path / "table.txt").write_text("segment_id,x,y,z\n")
    with pytest.raises(PointsError, match="unknown points table format"):
        ReadPoints(str(tmp_path / "table.txt"))


def test_corrupt_avro_names_the_file_and_record(tmp_path):
    buffer = io.BytesIO()
    write_avro(buffer, some_points(50_000))
    data = buffer.getvalue()
    path = tmp_path / "cut.avro"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(PointsError, match=rf"{path}: record \d+ is unreadable"):
        read_points(str(path))
    path.write_bytes(b"not avro")
    with pytest.raises(PointsError, match=f"{path}: cannot read the header"):
        ReadPoints(str(path))


# Precomputed skeletons -----------------------------------------------------------------------

def y_skeleton() -> Skeleton:
    """A trunk of 100 voxels along x from (10, 20, 5) and a 60-voxel branch along y from its
    middle; nm with voxel i at i * resolution, radius 100 nm."""
    trunk = [(10 + i, 20, 5) for i in range(100)]
    branch = [(60, 21 + j, 5) for j in range(60)]
    vertices = np.array(trunk + branch, np.float32) * np.float32(RESOLUTION)
    edges = [(i, i + 1) for i in range(99)] + [(50, 100)] + [(100 + j, 101 + j) for j in range(59)]
    return Skeleton(vertices, np.array(edges, np.uint32), radii=np.full(160, 100, np.float32),
                    space="physical")


def expected_y_points(segment_id: int) -> list[Point]:
    # The root is the first end in (x, y, z) order, (10, 20, 5). Then a point every 47 voxels
    # of 32 nm (the first vertex >= 1,500 nm on): x = 57 on the trunk; from there 3 voxels to
    # the branch point and 44 along the branch (y = 64), or 47 along the trunk (x = 104).
    return [Point(segment_id, node, *xyz) for node, xyz in enumerate(
        [(10, 20, 5), (57, 20, 5), (60, 64, 5), (104, 20, 5)])]


def test_sampling_a_y_shape():
    skeleton = y_skeleton()
    nodes = sample_nodes(skeleton.vertices, skeleton.edges, 1500.0)
    voxels = (skeleton.vertices[nodes] / np.float32(RESOLUTION)).round().astype(int).tolist()
    assert voxels == [[10, 20, 5], [57, 20, 5], [60, 64, 5], [104, 20, 5]]
    order = np.random.default_rng(0).permutation(len(skeleton.vertices))
    rank = np.argsort(order)  # the same skeleton with its vertices listed in another order
    again = sample_nodes(skeleton.vertices[order], rank[skeleton.edges], 1500.0)
    np.testing.assert_array_equal(order[again], nodes)


def write_unsharded(directory, skeletons: dict[int, Skeleton], gzipped=()):
    directory.mkdir(parents=True)
    (directory / "info").write_text(json.dumps(skeletons_info()))
    for segment_id, skeleton in skeletons.items():
        data = to_precomputed(skeleton, RESOLUTION)
        if segment_id in gzipped:
            (directory / f"{segment_id}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / str(segment_id)).write_bytes(data)
    (directory / "1-2-3.spatial").write_text("{}")  # not a skeleton: ignored


def write_sharded(base_url: str, skeletons: dict[int, Skeleton]):
    sharding = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0,
                "hash": "murmurhash3_x86_128", "minishard_bits": 1, "shard_bits": 1,
                "minishard_index_encoding": "gzip", "data_encoding": "gzip"}
    # Vertices stored in voxel units here; the info transform scales them to nm.
    info = {**skeletons_info(), "sharding": sharding,
            "transform": [RESOLUTION[0], 0, 0, 0, 0, RESOLUTION[1], 0, 0, 0, 0, RESOLUTION[2], 0]}
    store = ts.KvStore.open({"driver": "neuroglancer_uint64_sharded", "base": base_url,
                             "metadata": sharding}).result()
    for segment_id, skeleton in skeletons.items():
        in_voxels = Skeleton(skeleton.vertices / np.float32(RESOLUTION), skeleton.edges,
                             radii=skeleton.radius, extra_attributes=[info["vertex_attributes"][0]])
        store.write(struct.pack(">Q", segment_id), in_voxels.to_precomputed()).result()
    ts.KvStore.open(base_url).result().write("info", json.dumps(info)).result()


SEGMENTS = {5: y_skeleton(), 2**64 - 2: y_skeleton()}


def test_unsharded_skeletons(tmp_path):
    write_unsharded(tmp_path / "skeletons", SEGMENTS, gzipped={5})
    got = through_beam(tmp_path, ReadPoints(str(tmp_path / "skeletons"), resolution=RESOLUTION))
    assert got == sorted(expected_y_points(5) + expected_y_points(2**64 - 2))
    allowed = ReadPoints(str(tmp_path / "skeletons"), segment_ids=[5, 6], resolution=RESOLUTION)
    assert through_beam(tmp_path / "allowed", allowed) == expected_y_points(5)


def test_sharded_skeletons(tmp_path):
    write_sharded(f"file://{tmp_path}/sharded/", SEGMENTS)
    got = through_beam(tmp_path, ReadPoints(str(tmp_path / "sharded"), resolution=RESOLUTION))
    assert got == sorted(expected_y_points(5) + expected_y_points(2**64 - 2))


def test_skeleton_source_errors(tmp_path):
    write_unsharded(tmp_path / "skeletons", {5: y_skeleton()})
    with pytest.raises(PointsError, match="need the resolution"):
        ReadPoints(str(tmp_path / "skeletons"))
    (tmp_path / "skeletons" / "5").write_bytes(to_precomputed(y_skeleton(), RESOLUTION)[:-7])
    with pytest.raises(Exception, match=r"skeleton of segment 5 has \d+ bytes, expected"):
        through_beam(tmp_path, ReadPoints(str(tmp_path / "skeletons"), resolution=RESOLUTION))
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "info").write_text(json.dumps({"type": "image", "scales": []}))
    with pytest.raises(SkeletonError, match="expected 'neuroglancer_skeletons'"):
        ReadPoints(str(tmp_path / "image"), resolution=RESOLUTION)


def test_points_and_skeletons_on_gcs(gcs, tmp_path):
    # Sharded skeletons are read with ranged reads, for which the emulator (as patched in
    # conftest) sends no object generation, so TensorStore refuses them: they are tested
    # locally only.
    write_unsharded(tmp_path / "local" / "unsharded", SEGMENTS)
    root = gcs.upload_dir(tmp_path / "local", "skeletons")
    out = f"gs://{gcs.bucket}/run/points.avro"
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = p | ReadPoints(f"{root}/unsharded", resolution=RESOLUTION) | WritePoints(out)
    expected = sorted(expected_y_points(5) + expected_y_points(2**64 - 2))
    assert read_points(out) == expected
    again = through_beam(tmp_path, ReadPoints(out, segment_ids=[5]))
    assert again == expected_y_points(5)


def test_points_command(tmp_path, capsys):
    from segclr_beam import cli

    write_unsharded(tmp_path / "skeletons", SEGMENTS)
    out = str(tmp_path / "points.avro")
    cli.main(["points", "--from", str(tmp_path / "skeletons"), "--out", out, "--segments", "5"])
    assert read_points(out) == expected_y_points(5)
    assert capsys.readouterr().out.strip() == out
    with pytest.raises(SystemExit, match="segclr-beam points: .*none-.*: no points table matches"):
        cli.main(["points", "--from", str(tmp_path / "none-*.csv"), "--out", out])


def test_excel_csv_with_byte_order_mark(tmp_path):
    table = tmp_path / "excel.csv"
    table.write_bytes("\ufeffsegment_id,x,y,z\r\n9,1,2,3\r\n".encode("utf-8"))
    assert read_points(str(table)) == [Point(9, 0, 1, 2, 3)]
