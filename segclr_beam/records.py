"""The records that flow between the stages and into every output: sample points, embedding
tables, segment ids as stored in Avro and TFRecord, the names of the output variants, and the
pair records of training tables (written by segclr_beam.pairs, read by segclr_beam.views)."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

_UINT64 = 1 << 64


class Point(NamedTuple):
    """One skeleton sample point; x, y, z in voxels at the embedding resolution."""

    segment_id: int
    node_id: int
    x: int
    y: int
    z: int


def as_long(segment_id: int) -> int:
    """A uint64 segment id as the Avro long (int64) with the same bits."""
    return segment_id - _UINT64 if segment_id >= 1 << 63 else segment_id


def as_uint64(value: int) -> int:
    """The uint64 segment id stored in an Avro long."""
    return value + _UINT64 if value < 0 else value


def variant_name(radius_nm: float | None) -> str:
    """Output tree name: `raw` for unaggregated embeddings, else e.g. `agg10um`."""
    if radius_nm is None:
        return "raw"
    if radius_nm % 1000 == 0:
        return f"agg{int(radius_nm) // 1000}um"
    return f"agg{radius_nm:g}nm"


def output_variants(radii_nm: Sequence[float], raw: bool = True) -> dict[str, float | None]:
    """{tree name: aggregation radius or None}: the `variants` argument of WriteEmbeddings."""
    variants = {variant_name(None): None} if raw else {}
    variants.update({variant_name(float(r)): float(r) for r in radii_nm})
    return variants


# A pair table's files in its directory: PAIR_TABLE_PREFIX-SSSSS-of-NNNNN.
PAIR_TABLE_PREFIX = "pairs.tfrecord"
# The features of a pair record, as in the published SegCLR training tables: shape, dtype.
PAIR_SCHEMA = {
    **{f"center-{v}": ((1, 3), "int64") for v in (0, 1)},
    **{f"skeleton_id-{v}": ((1,), "int64") for v in (0, 1)},
    "distance": ((1,), "int64"),
    **{f"dist_to_border-{v}": ((1,), "int64") for v in (0, 1)},
    "vol_name": ((1,), "string"),
    "label_volume_name": ((1,), "string"),
}


def pair_example(centers: np.ndarray, segment_id: int, distance_nm: int,
                 dist_to_border: tuple[int, int], vol_name: str, label_volume_name: str) -> bytes:
    """One serialised pair record (tf.train.Example, deterministic bytes): `centers` [2, 3]
    voxels (x, y, z) on segment `segment_id`, stored bit for bit as int64."""
    from tensorflow.core.example import example_pb2  # protobuf only, not TensorFlow's runtime

    example = example_pb2.Example()
    feature = example.features.feature
    feature["distance"].int64_list.value.append(int(distance_nm))
    feature["vol_name"].bytes_list.value.append(vol_name.encode())
    feature["label_volume_name"].bytes_list.value.append(label_volume_name.encode())
    for view in (0, 1):
        feature[f"center-{view}"].int64_list.value.extend(int(v) for v in centers[view])
        feature[f"skeleton_id-{view}"].int64_list.value.append(as_long(int(segment_id)))
        feature[f"dist_to_border-{view}"].int64_list.value.append(int(dist_to_border[view]))
    return example.SerializeToString(deterministic=True)


@dataclasses.dataclass(frozen=True)
class EmbeddingTable:
    """(Point, embedding) records as columns, for the per-segment and per-shard work."""

    segment_ids: np.ndarray  # uint64 [N]
    node_ids: np.ndarray  # int64 [N]
    xyz: np.ndarray  # int64 [N, 3], voxels
    embeddings: np.ndarray  # float32 [N, D]

    _BLOCK = 1 << 16

    @classmethod
    def from_records(cls, records: Iterable[tuple[Point, np.ndarray]]) -> "EmbeddingTable":
        """Stack records into fixed-size numpy blocks, never holding them as a Python list."""
        blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        dim = k = 0
        for point, embedding in records:
            if not blocks or k == cls._BLOCK:
                if not blocks:
                    dim = len(embedding)
                blocks.append((np.empty(cls._BLOCK, np.uint64), np.empty((cls._BLOCK, 4), np.int64),
                               np.empty((cls._BLOCK, dim), np.float32)))
                k = 0
            if np.shape(embedding) != (dim,):
                raise ValueError(f"embedding of segment {point.segment_id} node {point.node_id} "
                                 f"has shape {np.shape(embedding)}, expected ({dim},) like the "
                                 f"other nodes")
            segments, nodes, floats = blocks[-1]
            segments[k] = point.segment_id
            nodes[k] = point[1:]
            floats[k] = embedding
            k += 1
        if not blocks:
            return cls(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty((0, 3), np.int64),
                       np.empty((0, 0), np.float32))
        last = len(blocks) - 1
        columns = [np.concatenate([block[c][:k] if b == last else block[c]
                                   for b, block in enumerate(blocks)]) for c in range(3)]
        return cls(columns[0], columns[1][:, 0].copy(), columns[1][:, 1:].copy(), columns[2])

    @classmethod
    def concatenate(cls, tables: Iterable["EmbeddingTable"]) -> "EmbeddingTable":
        """The rows of `tables` (at least one), one table after the other."""
        tables = list(tables)
        return cls(*(np.concatenate([getattr(t, f.name) for t in tables])
                     for f in dataclasses.fields(cls)))

    def __len__(self) -> int:
        return len(self.node_ids)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def points(self) -> Iterator[Point]:
        """The rows as Points, converted a block at a time."""
        for a in range(0, len(self), self._BLOCK):
            b = a + self._BLOCK
            for segment_id, node_id, (x, y, z) in zip(self.segment_ids[a:b].tolist(),
                                                      self.node_ids[a:b].tolist(),
                                                      self.xyz[a:b].tolist()):
                yield Point(segment_id, node_id, x, y, z)

    def take(self, index) -> "EmbeddingTable":
        return EmbeddingTable(self.segment_ids[index], self.node_ids[index], self.xyz[index],
                              self.embeddings[index])

    def sorted(self) -> "EmbeddingTable":
        """Rows ordered by (segment, node); raise if a segment repeats a node id or a position."""
        table = self.take(np.lexsort((self.node_ids, self.segment_ids)))
        same_segment = table.segment_ids[1:] == table.segment_ids[:-1]
        repeated = np.flatnonzero(same_segment & (table.node_ids[1:] == table.node_ids[:-1]))
        if len(repeated):
            k = repeated[0]
            raise ValueError(f"duplicate node id {table.node_ids[k]} in segment "
                             f"{table.segment_ids[k]}")
        by_position = np.lexsort((*table.xyz.T[::-1], table.segment_ids))
        segments, xyz = table.segment_ids[by_position], table.xyz[by_position]
        repeated = np.flatnonzero((segments[1:] == segments[:-1])
                                  & (xyz[1:] == xyz[:-1]).all(axis=1))
        if len(repeated):
            a, b = by_position[repeated[0]], by_position[repeated[0] + 1]
            raise ValueError(f"nodes {table.node_ids[a]} and {table.node_ids[b]} of segment "
                             f"{table.segment_ids[a]} share the position "
                             f"{tuple(table.xyz[a].tolist())}; CSV rows must be unique per x, y, z")
        return table

    def segments(self) -> Iterator["EmbeddingTable"]:
        """Consecutive runs of one segment each (call on a sorted table)."""
        bounds = np.flatnonzero(self.segment_ids[1:] != self.segment_ids[:-1]) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(self)]):
            yield self.take(slice(a, b))
