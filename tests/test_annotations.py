"""The annotation layer: read back with TensorStore and a decoder written from the format's
description, compared with the run's raw tree and with neuroglancer's own writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import tensorstore as ts
from neuroglancer import AnnotationPropertySpec, CoordinateSpace
from neuroglancer.write_annotations import AnnotationWriter

from segclr_beam import annotations
from segclr_beam.reader import EmbeddingReader
from segclr_beam.records import Point
from segclr_beam.volume import Box

RESOLUTION = (8.0, 8.0, 40.0)
BOX = Box((100, 200, 0), (1124, 968, 300))  # a 4 x 3 x 2 grid of cells
DIM = 8
NUM_SHARDS = 4

_TYPES = {"uint8": ("u1", ()), "int8": ("i1", ()), "uint16": ("<u2", ()),
          "int16": ("<i2", ()), "uint32": ("<u4", ()), "int32": ("<i4", ()),
          "float32": ("<f4", ()), "rgb": ("u1", (3,)), "rgba": ("u1", (4,))}


def record_dtype(info: dict) -> np.dtype:
    """A point record as the format describes it: float32 x, y, z, then each property in the
    order of info, each at an offset aligned to its size, the record padded to 4 bytes."""
    names, formats, offsets, offset = ["position"], [("<f4", (3,))], [0], 12
    for p in info["properties"]:
        base, shape = _TYPES[p["type"]]
        size = np.dtype(base).itemsize
        assert offset % size == 0, f"property {p['id']} is not aligned"
        names.append(p["id"])
        formats.append((base, shape))
        offsets.append(offset)
        offset += size * int(np.prod(shape))
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": -(-offset // 4) * 4})


def kvstore(layer: Path, index: dict) -> ts.KvStore:
    return ts.KvStore.open({"driver": "neuroglancer_uint64_sharded",
                            "base": f"file://{layer / index['key']}/",
                            "metadata": index["sharding"]}).result()


def read_many(data: bytes, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The multiple-annotation encoding: uint64 count, the records, then their uint64 ids."""
    (count,) = struct.unpack_from("<Q", data)
    records = np.frombuffer(data, dtype, count, 8)
    ids = np.frombuffer(data, "<u8", count, 8 + count * dtype.itemsize)
    assert len(data) == 8 + count * (dtype.itemsize + 8)
    return records, ids


def read_layer(layer: Path) -> dict:
    """{annotation id: (segment id, record)} from by_id, checked against the other indexes."""
    info = json.loads((layer / "info").read_text())
    dtype = record_dtype(info)
    by_id = kvstore(layer, info["by_id"])
    nodes = {}
    for key in by_id.list().result():
        data = by_id.read(key).result().value
        record = np.frombuffer(data, dtype, 1)[0]
        count, segment = struct.unpack_from("<IQ", data, dtype.itemsize)
        assert count == 1 and len(data) == dtype.itemsize + 12
        nodes[struct.unpack(">Q", key)[0]] = (segment, record)

    (relationship,) = info["relationships"]
    related = kvstore(layer, relationship)
    for key in related.list().result():
        segment = struct.unpack(">Q", key)[0]
        records, ids = read_many(related.read(key).result().value, dtype)
        assert sorted(ids.tolist()) == sorted(i for i, (s, _) in nodes.items() if s == segment)
        assert all(r.tobytes() == nodes[i][1].tobytes() for r, i in zip(records, ids))
    assert len(related.list().result()) == len({s for s, _ in nodes.values()})

    (spatial,) = info["spatial"]
    cells = kvstore(layer, spatial)
    seen = []
    lower, size = np.array(info["lower_bound"]), np.array(spatial["chunk_size"])
    for key in cells.list().result():
        cell = morton_decode(struct.unpack(">Q", key)[0], spatial["grid_shape"])
        records, ids = read_many(cells.read(key).result().value, dtype)
        assert len(ids) <= spatial["limit"]
        inside = (records["position"] - lower) // size
        assert (inside == cell).all(), f"cell {cell} holds annotations of other cells"
        seen += ids.tolist()
    assert sorted(seen) == sorted(nodes), "every annotation in exactly one cell"
    return nodes


def morton_decode(code: int, grid_shape) -> list[int]:
    """Cell of a compressed Morton code: bit i of each axis that still has bits, in turn."""
    cell, j = [0, 0, 0], 0
    for i in range(max(int(s - 1).bit_length() for s in grid_shape)):
        for axis in range(3):
            if (1 << i) < grid_shape[axis]:
                cell[axis] |= ((code >> j) & 1) << i
                j += 1
    return cell


def make_records(seed: int = 0, segments: int = 30) -> list:
    rng = np.random.default_rng(seed)
    records = []
    for s in range(segments):
        segment_id = int(rng.integers(1, 2**64, dtype=np.uint64))
        n = int(rng.integers(1, 40))
        xyz = rng.integers(BOX.start, BOX.stop, (n, 3))
        for node_id, p in enumerate(xyz.tolist()):
            records.append((Point(segment_id, node_id, *p),
                            rng.normal(size=DIM).astype(np.float32)))
    return records


def write(records, root: Path, layer: annotations.Layer | None = None) -> None:
    layer = layer or annotations.Layer(RESOLUTION, BOX, DIM, NUM_SHARDS)
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = p | beam.Create(records) | annotations.WriteAnnotations(str(root), layer)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    records = make_records()
    root = tmp_path_factory.mktemp("layer")
    write(records, root)
    return records, root


def test_every_node_read_back_exactly(written):
    records, root = written
    nodes = read_layer(root / annotations.DIRECTORY)
    expected = {(p.segment_id, p.node_id): (p, e) for p, e in records}
    got = {(segment, int(r["node_id"])): r for segment, r in nodes.values()}
    assert got.keys() == expected.keys()
    for key, record in got.items():
        point, embedding = expected[key]
        # Positions are voxel centres; float32 holds them and the embeddings exactly.
        np.testing.assert_array_equal(record["position"], np.add(point[2:], 0.5))
        np.testing.assert_array_equal([record[f"e{k}"] for k in range(DIM)], embedding)


def test_info_describes_the_layer(written):
    records, root = written
    info = json.loads((root / annotations.DIRECTORY / "info").read_text())
    assert info["@type"] == "neuroglancer_annotations_v1"
    assert info["dimensions"] == {"x": [8e-9, "m"], "y": [8e-9, "m"], "z": [4e-8, "m"]}
    assert info["lower_bound"] == list(BOX.start) and info["upper_bound"] == list(BOX.stop)
    assert info["spatial"][0]["grid_shape"] == [4, 3, 2]
    assert info["by_id"]["sharding"]["shard_bits"] == 2  # NUM_SHARDS shard files per index
    assert len(list((root / annotations.DIRECTORY / "by_id").glob("*.shard"))) == NUM_SHARDS
    assert info["segclr"]["nodes"] == len(records)
    assert info["segclr"]["segments"] == len({p.segment_id for p, _ in records})
    colours = annotations.Colours.from_json(info["segclr"]["pca_rgb"])
    nodes = read_layer(root / annotations.DIRECTORY)
    embeddings = np.array([[r[f"e{k}"] for k in range(DIM)] for _, r in nodes.values()])
    np.testing.assert_array_equal(np.stack([r["pca_rgb"] for _, r in nodes.values()]),
                                  colours.rgb(embeddings))
    assert len(np.unique(colours.rgb(embeddings), axis=0)) > len(records) // 2


def test_records_are_neuroglancers_own(written, tmp_path):
    """The same annotations written by neuroglancer's AnnotationWriter (unsharded) have the
    same by-id bytes."""
    _, root = written
    layer = root / annotations.DIRECTORY
    info = json.loads((layer / "info").read_text())
    writer = AnnotationWriter(CoordinateSpace(names=["x", "y", "z"], units="nm",
                                              scales=list(RESOLUTION)),
                              "point", relationships=["segment"],
                              properties=[AnnotationPropertySpec(**p) for p in info["properties"]])
    nodes = read_layer(layer)
    for annotation_id, (segment, record) in nodes.items():
        values = {p["id"]: record[p["id"]] for p in info["properties"]}
        writer.add_point(record["position"].tolist(), id=annotation_id, segment=segment,
                         **values)
    writer.write(tmp_path / "reference")
    by_id = kvstore(layer, info["by_id"])
    for annotation_id in nodes:
        ours = by_id.read(struct.pack(">Q", annotation_id)).result().value
        assert ours == (tmp_path / "reference" / "by_id" / str(annotation_id)).read_bytes()


def test_rerun_gives_identical_bytes(written, tmp_path):
    records, root = written
    write(list(reversed(records)), tmp_path)
    assert files(tmp_path) == files(root)


@pytest.mark.parametrize("num_shards", [1, 2, 4, 1024, 65536])
def test_shard_names_are_cloud_volumes(num_shards):
    from cloudvolume.datasource.precomputed.sharding import ShardingSpecification

    keys = np.random.default_rng(num_shards).integers(0, 2 ** 64, 2000, np.uint64).tolist()
    keys += [0, 1, 2 ** 63, 2 ** 64 - 1]
    spec = ShardingSpecification.from_dict(annotations.sharding(num_shards))
    assert annotations.shard_names(keys, num_shards) == [
        spec.compute_shard_location(key).shard_number for key in keys]


def test_colours_follow_the_principal_axes():
    rng = np.random.default_rng(3)
    axes, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    scales = np.array([10.0, 5.0, 2.0] + [0.1] * (DIM - 3))
    embeddings = 3.0 + (rng.normal(size=(5000, DIM)) * scales) @ axes.T
    colours = annotations.Colours.fit(embeddings)
    for k in range(3):
        assert abs(colours.components[k] @ axes[:, k]) > 0.999
        assert colours.components[k][np.abs(colours.components[k]).argmax()] > 0
    np.testing.assert_allclose(colours.spread, annotations.COLOUR_SPREAD * scales[:3], rtol=0.05)
    assert colours.rgb(colours.mean[None]).tolist() == [[128, 128, 128]]
    along = colours.mean + np.outer([-100, 100], colours.components[0])
    assert colours.rgb(along)[:, 0].tolist() == [0, 255]
    again = annotations.Colours.fit(embeddings[rng.permutation(len(embeddings))])
    np.testing.assert_allclose(again.components, colours.components, atol=1e-9)


def test_colours_of_degenerate_samples():
    flat = annotations.Colours.fit(np.ones((5, DIM)))
    assert flat.rgb(np.ones((2, DIM))).tolist() == [[128, 128, 128]] * 2
    line = annotations.Colours.fit(np.outer(np.arange(10.0), np.eye(DIM)[2]))
    assert line.components[0].tolist() == np.eye(DIM)[2].tolist()
    assert not line.components[1:].any()


def test_layer_of_a_job_holds_every_node_of_the_raw_tree(small_run):
    nodes = read_layer(Path(small_run) / annotations.DIRECTORY)
    got = {(segment, int(r["node_id"])): r for segment, r in nodes.values()}
    expected = {}
    for segment in EmbeddingReader(str(Path(small_run) / "raw")):
        for node_id, xyz, embedding in zip(segment.node_ids, segment.xyz, segment.embeddings):
            expected[(segment.segment_id, int(node_id))] = (xyz, embedding)
    assert got.keys() == expected.keys() and len(got) > 100
    for key, record in got.items():
        xyz, embedding = expected[key]
        np.testing.assert_array_equal(record["position"], xyz + 0.5)
        # The layer holds the float32 embeddings themselves; CSV parses back to them exactly.
        np.testing.assert_array_equal([record[f"e{k}"] for k in range(len(embedding))],
                                      embedding)


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p._replace(x=BOX.stop[0]), "lies outside the box"),
    (lambda p: p._replace(node_id=2**31), "does not fit the int32 node_id"),
])
def test_bad_nodes_fail_without_a_layer(tmp_path, corrupt, message):
    records = make_records(segments=5)
    point, embedding = records[3]
    records[3] = (corrupt(point), embedding)
    with pytest.raises(Exception, match=message):
        write(records, tmp_path)
    assert not (tmp_path / annotations.DIRECTORY).exists()


def test_bad_layer_options():
    with pytest.raises(ValueError, match="empty"):
        annotations.Layer(RESOLUTION, Box((0, 0, 0), (0, 10, 10)), DIM, NUM_SHARDS)
    with pytest.raises(ValueError, match="num_shards"):
        annotations.Layer(RESOLUTION, BOX, DIM, 0)
    with pytest.raises(ValueError, match="repeat"):
        annotations.Layer(RESOLUTION, BOX, DIM, NUM_SHARDS, extra_properties=(
            AnnotationPropertySpec(id="e0", type="float32"),))


def test_further_properties_per_node(tmp_path):
    """Records may carry more per-node properties (a classifier's class and uncertainty)."""
    extra = (AnnotationPropertySpec(id="class", type="uint8"),
             AnnotationPropertySpec(id="uncertainty", type="float32"))
    layer = annotations.Layer(RESOLUTION, BOX, DIM, NUM_SHARDS, extra_properties=extra)
    records = [(p, e, {"class": p.node_id % 3, "uncertainty": p.node_id / 100})
               for p, e in make_records(segments=6)]
    write(records, tmp_path, layer)
    nodes = read_layer(tmp_path / annotations.DIRECTORY)
    assert len(nodes) == len(records)
    for _, record in nodes.values():
        assert record["class"] == record["node_id"] % 3
        assert record["uncertainty"] == np.float32(record["node_id"] / 100)
