"""Read a CSV-ZIP embedding tree: one written by segclr_beam.outputs, or a public SegCLR release.

A tree written here describes itself in info.json. The public h01 and MICrONS releases have
no such file; open them with their `num_shards` and `bytewidth` (and, if known, their
coordinate system).
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from typing import Iterable, Iterator

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from segclr_beam.outputs import INFO_NAME, CoordinateSystem
from segclr_beam.shards import check_sharding, read_json, shard_of


@dataclasses.dataclass(frozen=True)
class SegmentEmbeddings:
    """The nodes of one segment, sorted by node id."""

    segment_id: int
    node_ids: np.ndarray  # int64 [N]
    xyz: np.ndarray  # [N, 3] as written: int64 voxels, or float64 nm
    embeddings: np.ndarray  # float32 [N, D]

    def __len__(self) -> int:
        return len(self.node_ids)


class EmbeddingReader:
    """Random access by segment id, and iteration over every segment, of one output tree."""

    def __init__(self, path: str, num_shards: int | None = None, bytewidth: int | None = None,
                 coordinates: CoordinateSystem | None = None):
        self.path = path.rstrip("/")
        info_path = FileSystems.join(self.path, INFO_NAME)
        self.info: dict | None = None
        if FileSystems.exists(info_path):
            self.info = read_json(info_path)
            if "csv_zip" not in self.info:
                raise ValueError(f"{self.path} was written without CSV-ZIP files, the only "
                                 f"format this reader reads")
            for name, given in (("num_shards", num_shards), ("bytewidth", bytewidth)):
                if given is not None and given != self.info[name]:
                    raise ValueError(f"{name}={given} contradicts {info_path}, which says "
                                     f"{self.info[name]}")
            num_shards, bytewidth = self.info["num_shards"], self.info["bytewidth"]
            coordinates = CoordinateSystem.from_json(self.info["coordinates"])
        elif num_shards is None or bytewidth is None:
            raise ValueError(f"{self.path} has no {INFO_NAME} (or does not exist); to read a "
                             f"tree without one, give its num_shards and bytewidth")
        check_sharding(num_shards, bytewidth)
        self.num_shards = int(num_shards)
        self.bytewidth = int(bytewidth)
        self.coordinates = coordinates

    def shard_of(self, segment_id: int) -> int:
        return shard_of(segment_id, self.num_shards, self.bytewidth)

    def read_segment(self, segment_id: int) -> SegmentEmbeddings:
        """One segment's nodes; KeyError if the tree does not hold it."""
        segment_id = int(segment_id)
        shard = self.shard_of(segment_id)
        path = FileSystems.join(self.path, f"{shard}.zip")
        member = f"{segment_id}.csv"
        if not FileSystems.exists(path):
            raise KeyError(f"segment {segment_id} is not in {self.path} (no shard file {path})")
        with self._open(path) as archive:
            if member not in archive.NameToInfo:
                raise KeyError(f"segment {segment_id} is not in {path}")
            return self._parse(segment_id, archive.read(member))

    def read_segments(self, segment_ids: Iterable[int]) -> Iterator[SegmentEmbeddings]:
        """The nodes of those of `segment_ids` the tree holds (the others are skipped), each
        shard read once, in shard order."""
        by_shard: dict[int, list[int]] = {}
        for segment_id in sorted({int(s) for s in segment_ids}):
            by_shard.setdefault(self.shard_of(segment_id), []).append(segment_id)
        for shard, wanted in sorted(by_shard.items()):
            path = FileSystems.join(self.path, f"{shard}.zip")
            if not FileSystems.exists(path):
                continue
            with self._open(path) as archive:
                for segment_id in wanted:
                    member = f"{segment_id}.csv"
                    if member in archive.NameToInfo:
                        yield self._parse(segment_id, archive.read(member))

    def shard_paths(self) -> list[str]:
        """The tree's shard files, in shard order."""
        listing = FileSystems.match([FileSystems.join(self.path, "*.zip")])[0].metadata_list
        paths = {int(m.path.rsplit("/", 1)[-1][:-4]): m.path for m in listing
                 if m.path.rsplit("/", 1)[-1][:-4].isdigit()}
        return [paths[shard] for shard in sorted(paths)]

    def read_shard(self, path: str) -> Iterator[SegmentEmbeddings]:
        """The segments of one shard file, in archive order."""
        with self._open(path) as archive:
            for member in archive.namelist():
                yield self._parse(int(member.removesuffix(".csv")), archive.read(member))

    def __iter__(self) -> Iterator[SegmentEmbeddings]:
        """Every segment, shard by shard in shard order, members in archive order."""
        for path in self.shard_paths():
            yield from self.read_shard(path)

    @staticmethod
    def _open(path: str) -> zipfile.ZipFile:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return zipfile.ZipFile(io.BytesIO(f.read()))

    def _parse(self, segment_id: int, data: bytes) -> SegmentEmbeddings:
        """CSV rows `node_id,x,y,z,e0,...`; float64 parsing then float32 rounding is exact."""
        rows = np.loadtxt(io.StringIO(data.decode("ascii")), delimiter=",", dtype=np.float64,
                          ndmin=2)
        if rows.shape[1] < 5:
            raise ValueError(f"segment {segment_id} in {self.path}: rows have "
                             f"{rows.shape[1]} columns, expected node_id,x,y,z,e0,...")
        node_ids = rows[:, 0].astype(np.int64)
        xyz = rows[:, 1:4]
        if self.coordinates is not None and self.coordinates.unit == "voxel":
            xyz = xyz.astype(np.int64)
        return SegmentEmbeddings(segment_id, node_ids, xyz, rows[:, 4:].astype(np.float32))


def describe(reader: EmbeddingReader, segment: SegmentEmbeddings) -> str:
    """A few lines about one segment of a tree, for the command line."""
    lines = [f"segment {segment.segment_id} in {reader.path}: shard "
             f"{reader.shard_of(segment.segment_id)} of {reader.num_shards} "
             f"(bytewidth {reader.bytewidth})"]
    if reader.info is not None:
        radius = reader.info["aggregation_radius_nm"]
        lines.append(f"variant {reader.info['variant']}"
                     + (f", aggregation radius {radius:g} nm" if radius is not None else ""))
    unit = reader.coordinates.unit if reader.coordinates is not None else "unknown unit"
    lines.append(f"{len(segment)} nodes (ids {segment.node_ids.min()}..{segment.node_ids.max()}), "
                 f"embedding dim {segment.embeddings.shape[1]}")
    lo, hi = segment.xyz.min(axis=0).tolist(), segment.xyz.max(axis=0).tolist()
    lines.append(f"x, y, z ({unit}): {lo} .. {hi}")
    norms = np.linalg.norm(segment.embeddings.astype(np.float64), axis=1)
    lines.append(f"embedding norm: mean {norms.mean():.4g}, min {norms.min():.4g}, "
                 f"max {norms.max():.4g}")
    return "\n".join(lines)
