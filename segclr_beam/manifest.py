"""Run manifests: what a run embedded, recorded so that a later run re-embeds only what changed.

Every run writes `manifest/` next to its output trees:

    segments/{shard}.avro  every segment of the fingerprinted box: id, voxel fingerprint, voxels
    nodes/{shard}.avro     every embedded node: its point, the digest of its masked cutout and
                           its raw embedding (the exact float32 bits)
    manifest.json          the run's configuration and parameters, and every table file with
                           its record count, size and sha256; written last

Shards are the output trees' shards (MD5 of the segment id), so `nodes/{shard}.avro` holds the
segments of `raw/{shard}.zip`. Files hold sorted records with a fixed sync marker: reruns give
identical bytes.

A segment's output is a function of its own voxels only (skeletons see other segments as
boundary, cutouts mask them out) plus the EM, the model and the parameters. Its fingerprint
therefore covers exactly its voxels in the run's box grown by half a cutout (cutouts near the
edge of the box see that far): per chunk, blake2b-128 of the chunk origin and shape followed by
the segment's voxels as ascending C-order linear indices (uint32) in the chunk, which is the
set of its global (x, y, z) coordinates; the segment's fingerprint is blake2b-128 of its chunk
digests in chunk order. It does not involve the segment id, so a relabelled segment keeps it.

A cutout digest is blake2b-128, keyed with the model identity, of the uint8 cutout's shape and
bytes: an embedding is a pure function of the masked cutout and the model, so equal digests
mean equal embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Collection, Iterable, Iterator, NamedTuple, Sequence

import apache_beam as beam
import fastavro
import fastremap
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from segclr_beam import shards
from segclr_beam.records import Point, as_long, as_uint64
from segclr_beam.skeleton import plan_chunks
from segclr_beam.volume import Box, Volume

MANIFEST_DIR = "manifest"
MANIFEST_FILE = "manifest.json"
FORMAT = "segclr-beam manifest"
FORMAT_VERSION = 1
SEGMENTS, NODES = "segments", "nodes"
DIGEST_SIZE = 16
# Parameters a segment's embeddings depend on; any difference rules out reusing them.
BINDING = ("model", "em", "resolution_nm", "bbox", "chunk_size", "skeleton", "cutout_size",
           "points", "segments")
_SLAB_VOXELS = 1 << 21  # voxels sorted at once while fingerprinting a chunk
_AVRO_NAME = "segclr_beam.manifest"  # fixes the sync marker: reruns give equal bytes


class ManifestError(ValueError):
    """A run's manifest is missing, corrupt or inconsistent; the message names the file."""


class SegmentRecord(NamedTuple):
    """One segment of a segmentation version: id, voxel fingerprint, voxels in the box."""

    segment_id: int
    fingerprint: bytes
    voxels: int


class NodeRecord(NamedTuple):
    """One embedded node: its point, the digest of its masked cutout, its raw embedding."""

    point: Point
    cutout_digest: bytes
    embedding: np.ndarray  # float32 [D]


# Fingerprints --------------------------------------------------------------------------------

def chunk_digests(labels: np.ndarray, origin: Sequence[int],
                  segment_ids: Collection[int] | None = None) -> dict[int, tuple[bytes, int]]:
    """Per segment in one chunk (labels [x, y, z] with voxel [0, 0, 0] at `origin`): the digest
    of its voxels' global coordinates and its voxel count. Background (0) is skipped, and so are
    segments outside `segment_ids` if given.

    The chunk is relabelled and sorted in slabs along x, so memory stays bounded; the digest is
    the same as hashing the whole chunk's sorted indices at once.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.size >= 1 << 32:
        raise ValueError(f"chunk must be 3-D with fewer than 2**32 voxels, got {labels.shape}")
    plane = labels.shape[1] * labels.shape[2]
    header = np.asarray([*origin, *labels.shape], dtype="<i8").tobytes()
    hashers: dict[int, Any] = {}
    counts: dict[int, int] = {}
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    for a in range(0, labels.shape[0], step):
        local, remap = fastremap.renumber(np.ascontiguousarray(labels[a:a + step]).reshape(-1),
                                          preserve_zero=True)
        order = (np.argsort(local, kind="stable") + a * plane).astype("<u4")
        ends = np.cumsum(np.bincount(local))
        for segment_id, label in remap.items():
            segment_id = int(segment_id)
            if segment_id == 0 or (segment_ids is not None and segment_id not in segment_ids):
                continue
            start = int(ends[label - 1]) if label else 0
            if segment_id not in hashers:
                hashers[segment_id] = hashlib.blake2b(header, digest_size=DIGEST_SIZE)
                counts[segment_id] = 0
            hashers[segment_id].update(order[start:ends[label]])
            counts[segment_id] += int(ends[label]) - start
    return {s: (h.digest(), counts[s]) for s, h in hashers.items()}


def fingerprint(digests: Iterable[bytes]) -> bytes:
    """A segment's fingerprint from its chunk digests, given in chunk order."""
    return hashlib.blake2b(b"".join(digests), digest_size=DIGEST_SIZE).digest()


def fingerprint_box(bbox: Box, cutout_size: int) -> Box:
    """The voxels a run's outputs depend on: its box grown by half a cutout."""
    return bbox.grow(cutout_size // 2)


class _FingerprintChunk(beam.DoFn):
    """(chunk index, chunk box) -> (segment id, (chunk index, digest, voxels)) per segment."""

    def __init__(self, segmentation: Volume, segment_ids: frozenset[int] | None):
        self._segmentation, self._segment_ids = segmentation, segment_ids
        self._chunks = beam.metrics.Metrics.counter("segclr", "chunks_fingerprinted")

    def setup(self):
        self._segmentation.store  # open the TensorStore once per worker

    def process(self, element: tuple[int, Box]):
        index, box = element
        found = chunk_digests(self._segmentation.read(box), box.start, self._segment_ids)
        self._chunks.inc()
        for segment_id, (digest, voxels) in found.items():
            yield segment_id, (index, digest, voxels)


def _segment_record(segment_id: int, pieces: Iterable[tuple[int, bytes, int]]) -> SegmentRecord:
    pieces = sorted(pieces)
    return SegmentRecord(segment_id, fingerprint(d for _, d, _ in pieces),
                         sum(v for _, _, v in pieces))


class Fingerprints(beam.PTransform):
    """PBegin -> SegmentRecord of every segment (or of `segment_ids`) with voxels in `box`.

    One pass over the segmentation in chunks of `chunk_size` voxels, read independently and in
    parallel; voxels outside the volume read as background. Only digests are shuffled.
    """

    def __init__(self, segmentation: Volume, box: Box, chunk_size: int | Sequence[int],
                 segment_ids: Collection[int] | None = None):
        super().__init__()
        self._chunks = [chunk.core for chunk in plan_chunks(box, chunk_size, box)]
        self._segmentation = segmentation
        self._segment_ids = None if segment_ids is None else frozenset(map(int, segment_ids))

    def expand(self, pbegin):
        return (pbegin
                | "Chunks" >> beam.Create(list(enumerate(self._chunks)))
                | "SpreadChunks" >> beam.Reshuffle()
                | "DigestChunks" >> beam.ParDo(_FingerprintChunk(self._segmentation,
                                                                 self._segment_ids))
                | "BySegment" >> beam.GroupByKey()
                | "Combine" >> beam.MapTuple(_segment_record))


# Cutout digests ------------------------------------------------------------------------------

def cutout_key(model: dict) -> bytes:
    """The blake2b key of a model's cutout digests, from its identity record."""
    return hashlib.blake2b(model["model_id"].encode(), digest_size=32).digest()


def cutout_digest(cutout: np.ndarray, key: bytes) -> bytes:
    """Digest of a uint8 masked cutout for the model whose `cutout_key` is `key`."""
    digest = hashlib.blake2b(np.asarray(cutout.shape, dtype="<i8").tobytes(),
                             digest_size=DIGEST_SIZE, key=key)
    digest.update(np.ascontiguousarray(cutout, dtype=np.uint8))
    return digest.digest()


# Tables --------------------------------------------------------------------------------------

_DIGEST = {"type": "fixed", "name": "Digest", "size": DIGEST_SIZE}
_ID_DOC = "a uint64 stored as the int64 with the same bits"
SEGMENTS_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Segment", "namespace": "segclr_beam.manifest",
    "doc": "A segment of the fingerprinted box; voxels counted in that box.",
    "fields": [{"name": "segment_id", "type": "long", "doc": _ID_DOC},
               {"name": "fingerprint", "type": _DIGEST},
               {"name": "voxels", "type": "long"}],
})
NODES_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Node", "namespace": "segclr_beam.manifest",
    "doc": "An embedded node; x, y, z in voxels at the embedding resolution.",
    "fields": [{"name": "segment_id", "type": "long", "doc": _ID_DOC},
               *({"name": name, "type": "long"} for name in ("node_id", "x", "y", "z")),
               {"name": "cutout_digest", "type": _DIGEST},
               {"name": "embedding", "type": "bytes", "doc": "float32 little-endian values"}],
})


def _segment_to_avro(record: SegmentRecord) -> dict:
    return {"segment_id": as_long(record.segment_id), "fingerprint": record.fingerprint,
            "voxels": record.voxels}


def _segment_from_avro(row: dict) -> SegmentRecord:
    return SegmentRecord(as_uint64(row["segment_id"]), row["fingerprint"], row["voxels"])


def _node_to_avro(record: NodeRecord) -> dict:
    p = record.point
    return {"segment_id": as_long(p.segment_id), "node_id": p.node_id, "x": p.x, "y": p.y,
            "z": p.z, "cutout_digest": record.cutout_digest,
            "embedding": np.asarray(record.embedding, dtype="<f4").tobytes()}


def _node_from_avro(row: dict) -> NodeRecord:
    point = Point(as_uint64(row["segment_id"]), row["node_id"], row["x"], row["y"], row["z"])
    return NodeRecord(point, row["cutout_digest"],
                      np.frombuffer(row["embedding"], dtype="<f4").astype(np.float32))


class _Table(NamedTuple):
    schema: dict
    to_avro: Any
    from_avro: Any
    segment_id: Any  # record -> segment id (for sharding)
    order: Any  # record -> sort key


_TABLES = {
    SEGMENTS: _Table(SEGMENTS_SCHEMA, _segment_to_avro, _segment_from_avro,
                     lambda r: r.segment_id, lambda r: r.segment_id),
    NODES: _Table(NODES_SCHEMA, _node_to_avro, _node_from_avro,
                  lambda r: r.point.segment_id, lambda r: (r.point.segment_id, r.point.node_id)),
}


@dataclasses.dataclass(frozen=True)
class TableFile:
    """One shard file of a manifest table, as manifest.json lists it."""

    table: str
    name: str  # "{shard}.avro"
    records: int
    bytes: int
    sha256: str

    @property
    def shard(self) -> int:
        return int(self.name.removesuffix(".avro"))

    def to_json(self) -> dict:
        return {"name": self.name, "records": self.records, "bytes": self.bytes,
                "sha256": self.sha256}


def encode_table(table: str, records: Iterable) -> tuple[bytes, int]:
    """Records as an Avro file, sorted, with deterministic bytes; and how many there are."""
    spec = _TABLES[table]
    records = sorted(records, key=spec.order)
    return shards.encode_avro(spec.schema, (spec.to_avro(r) for r in records), _AVRO_NAME), \
        len(records)


def read_table_file(path: str, file: TableFile) -> list:
    """The records of one table file, checked against what manifest.json says of it."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read()
    except Exception as e:  # the filesystem's own error types vary by scheme
        raise ManifestError(f"{path}: cannot read a manifest table file: {e}") from None
    if len(data) != file.bytes or hashlib.sha256(data).hexdigest() != file.sha256:
        raise ManifestError(f"{path}: corrupt manifest table file ({len(data)} bytes whose "
                            f"sha256 differs from the one recorded in {MANIFEST_FILE})")
    try:
        rows = list(shards.read_avro(data))
    except Exception as e:  # fastavro raises several types for damaged files
        raise ManifestError(f"{path}: unreadable manifest table file: {e}") from None
    if len(rows) != file.records:
        raise ManifestError(f"{path}: {len(rows)} records, {MANIFEST_FILE} says {file.records}")
    return [_TABLES[file.table].from_avro(row) for row in rows]


# Writing -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ManifestFiles:
    """The table shard files of a manifest and its manifest.json, staged below the run root."""

    staging: shards.Staging
    num_shards: int
    bytewidth: int
    description: dict  # manifest.json without the tables

    def keys(self, tagged: tuple[str, Any]) -> list[tuple[str, int]]:
        table, record = tagged
        segment_id = _TABLES[table].segment_id(record)
        return [(table, shards.shard_of(segment_id, self.num_shards, self.bytewidth))]

    def write(self, key: tuple[str, int], tagged: Iterable[tuple[str, Any]]) -> TableFile:
        table, shard = key
        data, count = encode_table(table, (record for _, record in tagged))
        name = f"{shard}.avro"
        shards.write_file(self.staging.temp_path(f"{MANIFEST_DIR}/{table}", name), data)
        return TableFile(table, name, count, len(data), hashlib.sha256(data).hexdigest())

    def finalize(self, written: list[TableFile]) -> str:
        """Move every file into place, drop files of an earlier manifest, write manifest.json."""
        tables, files = {}, {}
        for table in _TABLES:
            mine = sorted((f for f in written if f.table == table), key=lambda f: f.shard)
            files[f"{MANIFEST_DIR}/{table}"] = [f.name for f in mine]
            tables[table] = {"records": sum(f.records for f in mine),
                             "files": [f.to_json() for f in mine]}
        info = {**self.description, "tables": tables}
        marker = (json.dumps(info, indent=1, sort_keys=True) + "\n").encode()
        path, = self.staging.finalize(files, {f"{MANIFEST_DIR}/{MANIFEST_FILE}": marker},
                                      stale=("*.avro",))
        return path


class WriteManifest(beam.PTransform):
    """{"segments": SegmentRecord, "nodes": NodeRecord} -> OUTPUT/manifest; returns the path of
    manifest.json once it is written (last, after every table file is in place).

    `description` holds the run's "config" and "parameters" (see segclr_beam.job.describe_run).
    """

    def __init__(self, output_root: str, description: dict, num_shards: int, bytewidth: int):
        super().__init__()
        self._files = _ManifestFiles(
            shards.Staging.below(output_root), int(num_shards), int(bytewidth),
            {"format": FORMAT, "format_version": FORMAT_VERSION,
             "sharding": {"num_shards": int(num_shards), "bytewidth": int(bytewidth)},
             **description})

    def expand(self, inputs: dict):
        if set(inputs) != set(_TABLES):
            raise ValueError(f"WriteManifest expects PCollections {sorted(_TABLES)}, "
                             f"got {sorted(inputs)}")
        tagged = [inputs[table] | f"Tag[{table}]" >> beam.Map(lambda r, t: (t, r), table)
                  for table in sorted(_TABLES)]
        files = self._files
        return (tagged
                | "Flatten" >> beam.Flatten()
                | "Shards" >> shards.WriteShards(files.keys, files.write, files.finalize))


def differences(previous: dict, current: dict) -> list[str]:
    """The BINDING parameters that differ, as "name: previous X, now Y"."""
    found = []
    for key in BINDING:
        a, b = previous.get(key), current.get(key)
        if key == "model":
            a, b = (m.get("model_id") if isinstance(m, dict) else m for m in (a, b))
        if key == "skeleton" and isinstance(a, dict) and isinstance(b, dict):
            found += [f"{name}: previous {a.get(name)}, now {b.get(name)}"
                      for name in sorted(set(a) | set(b))
                      if name != "chunk_size" and a.get(name) != b.get(name)]
        elif a != b:
            found.append(f"{key}: previous {_shown(a)}, now {_shown(b)}")
    return found


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class RecordManifest(beam.PTransform):
    """{"cutouts": (Point, cutout), "embeddings": (Point, embedding)} of a run -> its manifest.

    Adds the fingerprint pass (`fingerprints`) and the cutout digests for `model` (computed
    where the cutouts are made, so only digests are shuffled) and writes both tables.
    """

    def __init__(self, fingerprints: "Fingerprints", model: dict, write: WriteManifest):
        super().__init__()
        self._fingerprints, self._key, self._write = fingerprints, cutout_key(model), write

    def expand(self, inputs: dict):
        segments = inputs["cutouts"].pipeline | "Fingerprints" >> self._fingerprints
        digests = inputs["cutouts"] | "CutoutDigests" >> beam.Map(_keyed_digest, self._key)
        embeddings = inputs["embeddings"] | "ByNode" >> beam.MapTuple(
            lambda point, embedding: ((point.segment_id, point.node_id), embedding))
        nodes = ({"digest": digests, "embedding": embeddings}
                 | "JoinNodes" >> beam.CoGroupByKey()
                 | "Nodes" >> beam.MapTuple(_node_record))
        return {SEGMENTS: segments, NODES: nodes} | "Write" >> self._write


def _keyed_digest(record: tuple[Point, np.ndarray], key: bytes):
    point, cutout = record
    return (point.segment_id, point.node_id), (point, cutout_digest(cutout, key))


def _node_record(key: tuple[int, int], joined: dict) -> NodeRecord:
    (point, digest), = joined["digest"]
    embedding, = joined["embedding"]
    return NodeRecord(point, digest, embedding)


# Reading -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Manifest:
    """The manifest of a finished run, opened from the run's output root."""

    root: str  # the run's output root
    info: dict

    @property
    def path(self) -> str:
        return manifest_path(self.root)

    @classmethod
    def open(cls, run_root: str) -> "Manifest":
        """Read and check manifest.json; errors name the file and say what is wrong."""
        root = run_root.rstrip("/")
        path = manifest_path(root)
        if not FileSystems.exists(path):
            raise ManifestError(f"{path}: missing; {root} holds no finished run with a manifest "
                                "(an unfinished run, or one from before runs recorded manifests)")
        try:
            info = shards.read_json(path)
            if info["format"] != FORMAT or info["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format {info['format']!r} version {info['format_version']}, "
                                 f"expected {FORMAT!r} version {FORMAT_VERSION}")
            for key in ("config", "parameters", "sharding", "tables"):
                if not isinstance(info[key], dict):
                    raise ValueError(f"{key!r} is not an object")
            manifest = cls(root, info)
            for table in _TABLES:
                manifest.files(table)
        except (OSError, ValueError, KeyError, TypeError) as e:
            what = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise ManifestError(f"{path}: corrupt manifest: {what}") from None
        return manifest

    @property
    def config(self) -> dict:
        return self.info["config"]

    @property
    def parameters(self) -> dict:
        return self.info["parameters"]

    def shard_of(self, segment_id: int) -> int:
        sharding = self.info["sharding"]
        return shards.shard_of(segment_id, sharding["num_shards"], sharding["bytewidth"])

    def files(self, table: str) -> list[TableFile]:
        return [TableFile(table, f["name"], int(f["records"]), int(f["bytes"]), str(f["sha256"]))
                for f in self.info["tables"][table]["files"]]

    def file_path(self, file: TableFile) -> str:
        return FileSystems.join(self.root, MANIFEST_DIR, file.table, file.name)

    def check_files(self) -> None:
        """Every listed table file is there with its recorded size (contents: when read)."""
        for table in _TABLES:
            found = FileSystems.match([FileSystems.join(self.root, MANIFEST_DIR, table, "*.avro")])
            sizes = {m.path.rsplit("/", 1)[-1]: m.size_in_bytes for m in found[0].metadata_list}
            for file in self.files(table):
                if file.name not in sizes:
                    raise ManifestError(f"{self.file_path(file)}: missing; {self.path} lists it")
                if sizes[file.name] != file.bytes:
                    raise ManifestError(f"{self.file_path(file)}: {sizes[file.name]} bytes, "
                                        f"{self.path} says {file.bytes}")

    def read(self, table: str) -> Iterator:
        """Every record of a table, file by file (for small tables and tests)."""
        for file in self.files(table):
            yield from read_table_file(self.file_path(file), file)


def manifest_path(run_root: str) -> str:
    return FileSystems.join(run_root.rstrip("/"), MANIFEST_DIR, MANIFEST_FILE)


class ReadTable(beam.PTransform):
    """PBegin -> every record of one table of a manifest, one file per worker at a time."""

    def __init__(self, manifest: Manifest, table: str):
        super().__init__()
        self._files = [(manifest.file_path(f), f) for f in manifest.files(table)]

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(self._files)
                | "SpreadFiles" >> beam.Reshuffle()
                | "Read" >> beam.FlatMapTuple(read_table_file))
