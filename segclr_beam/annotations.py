"""Neuroglancer precomputed annotations of a run's embeddings: one point per node.

Each point carries the node id, its embedding's first three principal components as an RGB
colour (`pca_rgb`), the embedding's values (`e0`..) and any further per-node properties, and
is related to its segment (relationship `segment`), so that a Neuroglancer annotation layer
linked to the segmentation shows the nodes of the selected segments. Neuroglancer properties
have no 64-bit type: the segment id is carried by the relationship, not a property.

    annotations/info          neuroglancer_annotations_v1, written last (a layer without it
                              is incomplete); also the colour basis under "segclr"
    annotations/by_id/        annotation id -> the node and its segment
    annotations/segment/      segment id -> the segment's nodes
    annotations/spatial0/     cell of CELL_VOXELS^3 voxels -> the nodes in it

Every index is neuroglancer_uint64_sharded_v1, with as many shard files as the run's
`num_shards` rounded up to a power of two. Records are laid out by neuroglancer's own
AnnotationWriter (record dtype, property order); shard files are assembled by cloud-volume's
sharding (the same murmurhash3 shard rule that Neuroglancer and TensorStore read) one shard per
task, and staged and put in place by segclr_beam.shards, so the layer works on gs:// and
appears whole or not at all. Positions are in voxels at the embedding resolution, at voxel
centres (+0.5, as the skeletons). Annotation ids number the nodes of each segment group
(`segment hash % num_shards`) in (segment, node) order: unique within a run, and the same for
the same nodes and sharding.

Limits: one spatial level, so Neuroglancer loads every cell in view, however far out it is
zoomed; each shard file is assembled in one worker's memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import apache_beam as beam
import mmh3
import numpy as np
from cloudvolume.datasource.precomputed.common import compressed_morton_code
from cloudvolume.datasource.precomputed.sharding import ShardingSpecification
from neuroglancer import AnnotationPropertySpec, CoordinateSpace
from neuroglancer.write_annotations import AnnotationWriter

from segclr_beam import shards
from segclr_beam.records import EmbeddingTable
from segclr_beam.volume import Box

DIRECTORY = "annotations"
INFO_NAME = "info"
RELATIONSHIP = "segment"
BY_ID, SPATIAL = "by_id", "spatial0"
INDEXES = (BY_ID, RELATIONSHIP, SPATIAL)
CELL_VOXELS = 256       # spatial index cell edge, voxels at the embedding resolution
MINISHARD_BITS = 6      # 64 minishards per shard file: a 1 KiB shard index
COLOUR_SAMPLE = 10000   # nodes the colour basis is fitted on
COLOUR_SPREAD = 2.0     # standard deviations of a component that span the colour range


# Colours -------------------------------------------------------------------------------------

def node_hash(segment_id: int, node_id: int) -> int:
    """A 64-bit hash of a node: the colour sample is the nodes with the smallest."""
    key = struct.pack("<QQ", segment_id, node_id)
    return int.from_bytes(hashlib.md5(key).digest()[:8], "little")


@dataclasses.dataclass(frozen=True)
class Colours:
    """An embedding's first three principal components as an RGB colour.

    The basis is fitted once on a sample of nodes chosen by hash, with each component's sign
    fixed by its largest loading, so the same nodes give the same colours.
    """

    mean: np.ndarray        # float64 [D]
    components: np.ndarray  # float64 [3, D]; rows of zeros where the sample has no variance
    spread: np.ndarray      # float64 [3]; a component value of +-spread maps to 255 / 0

    @classmethod
    def fit(cls, embeddings: np.ndarray) -> "Colours":
        embeddings = np.asarray(embeddings, np.float64)
        dim = embeddings.shape[1]
        mean = embeddings.mean(axis=0) if len(embeddings) else np.zeros(dim)
        components, spread = np.zeros((3, dim)), np.ones(3)
        if len(embeddings) > 1:
            centred = embeddings - mean
            _, values, axes = np.linalg.svd(centred, full_matrices=False)
            k = min(3, int((values > values[0] * 1e-6).sum()) if values[0] > 0 else 0)
            signs = np.sign(axes[np.arange(k), np.abs(axes[:k]).argmax(axis=1)])
            components[:k] = axes[:k] * signs[:, None]
            spread[:k] = COLOUR_SPREAD * values[:k] / np.sqrt(len(embeddings) - 1)
        return cls(mean, components, spread)

    def rgb(self, embeddings: np.ndarray) -> np.ndarray:
        """uint8 [N, 3] colours: mid-grey at the mean, saturating beyond `spread`."""
        projected = (np.asarray(embeddings, np.float64) - self.mean) @ self.components.T
        return np.clip(np.rint(127.5 + 127.5 * projected / self.spread), 0, 255).astype(np.uint8)

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "components": self.components.tolist(),
                "spread": self.spread.tolist(), "sample": f"the {COLOUR_SAMPLE} nodes with "
                "the smallest md5 of (segment id, node id) as two uint64 little-endian"}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "Colours":
        return cls(*(np.asarray(value[k], np.float64) for k in ("mean", "components", "spread")))


# Layout --------------------------------------------------------------------------------------

def sharding(num_shards: int) -> dict:
    """The neuroglancer_uint64_sharded_v1 spec of every index of a run with `num_shards`."""
    shards.check_sharding(num_shards, 8)
    return {"@type": "neuroglancer_uint64_sharded_v1", "hash": "murmurhash3_x86_128",
            "preshift_bits": 0, "minishard_bits": MINISHARD_BITS,
            "shard_bits": (num_shards - 1).bit_length(),
            "minishard_index_encoding": "raw", "data_encoding": "raw"}


@dataclasses.dataclass(frozen=True)
class Layer:
    """What fixes an annotation layer's bytes: voxel size, box, properties and sharding."""

    resolution_nm: tuple[float, float, float]
    box: Box
    embedding_dim: int
    num_shards: int
    extra_properties: tuple[AnnotationPropertySpec, ...] = ()

    def __post_init__(self):
        if len(self.resolution_nm) != 3 or min(self.resolution_nm) <= 0:
            raise ValueError(f"resolution_nm must be three positive numbers, "
                             f"got {self.resolution_nm}")
        if self.box.is_empty():
            raise ValueError(f"annotation box {self.box} is empty")
        if isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int) \
                or self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be an integer >= 1, got {self.embedding_dim!r}")
        shards.check_sharding(self.num_shards, 8)
        names = [p.id for p in self.properties()]
        if len(set(names)) != len(names):
            raise ValueError(f"annotation property ids repeat: {sorted(names)}")

    def properties(self) -> list[AnnotationPropertySpec]:
        # int32, not uint32: neuroglancer 2.40's writer misaligns uint32 properties.
        own = [AnnotationPropertySpec(id="node_id", type="int32",
                                      description="node id within its segment"),
               AnnotationPropertySpec(id="pca_rgb", type="rgb",
                                      description="first three principal components of the "
                                                  "embedding as red, green, blue")]
        own += [AnnotationPropertySpec(id=f"e{k}", type="float32",
                                       description=f"embedding value {k}")
                for k in range(self.embedding_dim)]
        return own + list(self.extra_properties)

    def writer(self) -> AnnotationWriter:
        """Neuroglancer's writer for this layer: its record dtype and property order."""
        space = CoordinateSpace(names=["x", "y", "z"], units="nm",
                                scales=list(self.resolution_nm))
        return AnnotationWriter(space, "point", relationships=[RELATIONSHIP],
                                properties=self.properties())

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(-(-s // CELL_VOXELS) for s in self.box.shape)

    def cells(self, xyz: np.ndarray) -> np.ndarray:
        """uint64 [N] spatial index keys (compressed Morton codes) of voxel positions."""
        return np.asarray(compressed_morton_code(
            (np.asarray(xyz) - self.box.start) // CELL_VOXELS, self.grid_shape),
            np.uint64).reshape(-1)

    def encode(self, table: EmbeddingTable, colours: Colours,
               extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The annotation records of a table's rows, as [N] void bytes of the record size."""
        writer = self.writer()
        dtype = np.dtype(writer.dtype)
        records = np.zeros(len(table), dtype)
        records["geometry"] = table.xyz + 0.5
        values = {"node_id": table.node_ids, "pca_rgb": colours.rgb(table.embeddings),
                  **{f"e{k}": table.embeddings[:, k] for k in range(self.embedding_dim)},
                  **(extra or {})}
        for i, spec in enumerate(writer.properties):
            records[f"property{i}"] = values[spec.id]
        return records.view(np.dtype((np.void, dtype.itemsize)))

    def info(self, colours: Colours | None, limit: int, segments: int, nodes: int) -> dict:
        writer = self.writer()
        spec = sharding(self.num_shards)
        info = {
            "@type": "neuroglancer_annotations_v1",
            "dimensions": writer.coordinate_space.to_json(),
            "lower_bound": [float(v) for v in self.box.start],
            "upper_bound": [float(v) for v in self.box.stop],
            "annotation_type": "point",
            "properties": [p.to_json() for p in writer.properties],
            "relationships": [{"id": RELATIONSHIP, "key": RELATIONSHIP, "sharding": spec}],
            "by_id": {"key": BY_ID, "sharding": spec},
            "spatial": [{"key": SPATIAL, "grid_shape": list(self.grid_shape),
                         "chunk_size": [CELL_VOXELS] * 3, "limit": max(1, limit),
                         "sharding": spec}],
            "segclr": {"segments": segments, "nodes": nodes, "cell_voxels": CELL_VOXELS},
        }
        if colours is not None:
            info["segclr"]["pca_rgb"] = colours.to_json()
        return info


# Index entries and shard files ---------------------------------------------------------------

class _Entry(NamedTuple):
    """One annotation's place in one index: the shard file, the key, and the annotation."""

    index: str
    shard: str      # shard file number, hex as Neuroglancer names it
    key: int        # annotation id, segment id or cell
    id: int
    record: bytes
    segment_id: int


class _Shard(NamedTuple):
    """What one shard writer put in the staging directory."""

    index: str
    name: str
    keys: int
    annotations: int
    most_per_key: int


def _check_records(layer: Layer, tagged: Iterable) -> tuple[EmbeddingTable, dict]:
    """One group's (Point, embedding[, properties]) records as a sorted table and columns."""
    rows = list(tagged)
    table = EmbeddingTable.from_records((r[0], r[1]) for r in rows)
    names = [p.id for p in layer.extra_properties]
    extra = {name: np.array([r[2][name] for r in rows]) for name in names}
    order = np.lexsort((table.node_ids, table.segment_ids))
    table = table.take(order).sorted()  # in order already; raises on a repeated node
    extra = {name: column[order] for name, column in extra.items()}
    outside = ~((table.xyz >= layer.box.start) & (table.xyz < layer.box.stop)).all(axis=1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise ValueError(f"annotations: node {table.node_ids[k]} of segment "
                         f"{table.segment_ids[k]} at {tuple(table.xyz[k].tolist())} lies "
                         f"outside the box {layer.box}")
    too_large = (table.node_ids < 0) | (table.node_ids > np.iinfo(np.int32).max)
    if too_large.any():
        k = int(np.flatnonzero(too_large)[0])
        raise ValueError(f"annotations: node id {table.node_ids[k]} of segment "
                         f"{table.segment_ids[k]} does not fit the int32 node_id property")
    return table, extra


def shard_names(keys: Iterable[int], num_shards: int) -> list[str]:
    """The shard file (hex, as Neuroglancer names it) of each uint64 key under
    `sharding(num_shards)`: the low 64 bits of the key's murmurhash3_x86_128 (no preshift),
    without the minishard bits."""
    spec = sharding(num_shards)
    shard_bits, minishard_bits = spec["shard_bits"], spec["minishard_bits"]
    mask, width = (1 << shard_bits) - 1, -(-shard_bits // 4)
    return [format((mmh3.hash64(struct.pack("<Q", key), x64arch=False, signed=False)[0]
                    >> minishard_bits) & mask, "x").zfill(width) for key in keys]


class _Entries(beam.DoFn):
    """A segment group's records -> ((index, shard file), its annotations' entries there)
    per index and shard file: a few elements per group, not three per annotation."""

    def __init__(self, layer: Layer):
        self._layer = layer

    def process(self, element, colours: Colours) -> Iterator[tuple[tuple[str, str],
                                                                  list[_Entry]]]:
        group, tagged = element
        layer = self._layer
        table, extra = _check_records(layer, tagged)
        records = [record.tobytes() for record in layer.encode(table, colours, extra)]
        ids = (group + layer.num_shards * np.arange(len(table), dtype=np.uint64)).tolist()
        segments = table.segment_ids.tolist()
        for index, keys in ((BY_ID, ids), (RELATIONSHIP, segments),
                            (SPATIAL, layer.cells(table.xyz).tolist())):
            by_shard: dict[str, list[_Entry]] = {}
            for k, shard in enumerate(shard_names(keys, layer.num_shards)):
                by_shard.setdefault(shard, []).append(
                    _Entry(index, shard, keys[k], ids[k], records[k], segments[k]))
            yield from (((index, shard), entries) for shard, entries in by_shard.items())


def _many(entries: list[_Entry]) -> bytes:
    """Neuroglancer's multiple-annotation encoding: count, records, ids (ordered by id)."""
    entries = sorted(entries, key=lambda e: e.id)
    return b"".join([struct.pack("<Q", len(entries)), *(e.record for e in entries),
                     np.array([e.id for e in entries], "<u8").tobytes()])


class _WriteShard(beam.DoFn):
    """Write one index shard file into the staging directory and report what it holds."""

    def __init__(self, layer: Layer, staging: shards.Staging):
        self._layer, self._staging = layer, staging

    def setup(self):
        self._spec = ShardingSpecification.from_dict(sharding(self._layer.num_shards))

    def process(self, element) -> Iterator[_Shard]:
        (index, shard), batches = element
        by_key: dict[int, list[_Entry]] = {}
        for _, entries in batches:
            for entry in entries:
                by_key.setdefault(entry.key, []).append(entry)
        if index == BY_ID:  # one annotation per id, with its one related segment
            values = {key: e.record + struct.pack("<IQ", 1, e.segment_id)
                      for key, (e,) in by_key.items()}
        else:
            values = {key: _many(group) for key, group in by_key.items()}
        name = f"{shard}.shard"
        shards.write_file(self._staging.temp_path(f"{DIRECTORY}/{index}", name),
                          self._spec.synthesize_shard(dict(sorted(values.items()))))
        yield _Shard(index, name, len(by_key), sum(len(v) for v in by_key.values()),
                     max(len(v) for v in by_key.values()))


class WriteAnnotations(beam.PTransform):
    """PCollection[(Point, embedding[, {property: value}])] -> `root/annotations/`.

    Returns a PCollection of the info path, written once every shard file is in place.
    Records are checked while grouped: inside the layer's box, node ids that fit int32,
    each node once.
    """

    def __init__(self, root: str, layer: Layer):
        super().__init__()
        if not isinstance(root, str) or not root:
            raise ValueError(f"root must be a non-empty path, got {root!r}")
        self._layer = layer
        self._staging = shards.Staging.below(root)

    def expand(self, records):
        layer, staging = self._layer, self._staging
        colours = beam.pvalue.AsSingleton(
            records
            | "SampleKeys" >> beam.Map(lambda r: (node_hash(r[0].segment_id, r[0].node_id),
                                                  r[1]))
            | "Sample" >> beam.combiners.Top.Of(COLOUR_SAMPLE, key=lambda kv: kv[0],
                                                reverse=True)
            | "FitColours" >> beam.Map(lambda sample: Colours.fit(
                np.array([e for _, e in sorted(sample, key=lambda kv: kv[0])],
                         np.float64).reshape(-1, layer.embedding_dim))))
        return (records
                | "KeyByGroup" >> beam.Map(
                    lambda r: (shards.shard_of(r[0].segment_id, layer.num_shards, 8), r))
                | "GroupBySegmentGroup" >> beam.GroupByKey()
                | "Entries" >> beam.ParDo(_Entries(layer), colours)
                | "Shards" >> shards.WriteShards(
                    lambda batch: [batch[0]], _WriteShard(layer, staging),
                    lambda written, c: _finalize(layer, staging, written, c), colours)
                | "InfoFile" >> beam.FlatMap(lambda paths: paths))


def _finalize(layer: Layer, staging: shards.Staging, written: list[_Shard],
              colours: Colours) -> list[str]:
    """Put every shard file in place, the info last."""
    files = {f"{DIRECTORY}/{index}": sorted(w.name for w in written if w.index == index)
             for index in INDEXES}
    limit = max((w.most_per_key for w in written if w.index == SPATIAL), default=1)
    segments = sum(w.keys for w in written if w.index == RELATIONSHIP)
    nodes = sum(w.annotations for w in written if w.index == BY_ID)
    info = layer.info(colours if nodes else None, limit, segments, nodes)
    marker = (json.dumps(info, indent=1, sort_keys=True) + "\n").encode()
    return staging.finalize(files, {f"{DIRECTORY}/{INFO_NAME}": marker}, stale=("*.shard",))
