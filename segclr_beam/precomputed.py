"""Neuroglancer precomputed skeletons: writing one segment's file, and reading a directory of them.

The format is https://github.com/google/neuroglancer/blob/master/src/datasource/precomputed/
skeletons.md: one file per segment, or uint64-sharded files read through TensorStore's
neuroglancer_uint64_sharded key-value store. Files go through Beam's FileSystems, so gs:// works.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from typing import Any, Sequence

import numpy as np
import tensorstore as ts
from apache_beam.io.filesystems import FileSystems
from osteoid import Skeleton

from segclr_beam.shards import read_json
from segclr_beam.volume import kvstore_url


class SkeletonError(ValueError):
    """A skeleton directory or file cannot be read; the message names it."""


_RADIUS = {"id": "radius", "data_type": "float32", "num_components": 1}
_SEGMENT_FILE = re.compile(r"^(\d+)(\.gz)?$")


def to_precomputed(skeleton: Skeleton, resolution: Sequence[float]) -> bytes:
    """A skeleton (nm, voxel i at i * resolution) as a precomputed skeleton file: vertices
    at voxel centres, with the radius as a vertex attribute."""
    centres = skeleton.vertices + 0.5 * np.asarray(resolution, dtype=np.float32)
    out = Skeleton(centres.astype(np.float32), skeleton.edges, radii=skeleton.radius,
                   extra_attributes=[_RADIUS])
    return out.to_precomputed()


def from_precomputed(skeleton: Skeleton, resolution: Sequence[float]) -> Skeleton:
    """The inverse of `to_precomputed`'s placement: a skeleton read from a file (vertices at
    voxel centres, (i + 0.5) * resolution) moved back to voxel i at i * resolution, in place."""
    skeleton.vertices = skeleton.vertices - 0.5 * np.asarray(resolution)
    return skeleton


def skeletons_info() -> dict:
    """The info file of a directory of skeletons written by `to_precomputed`."""
    return {"@type": "neuroglancer_skeletons", "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
            "vertex_attributes": [_RADIUS]}


@dataclasses.dataclass
class SkeletonSource:
    """A directory of neuroglancer precomputed skeletons, unsharded or uint64-sharded.

    Pickles as its path and info, so Beam workers reopen it lazily.
    """

    path: str
    info: dict
    _shards: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __getstate__(self):
        return {**self.__dict__, "_shards": None}

    @classmethod
    def open(cls, path: str) -> "SkeletonSource":
        path = path.rstrip("/")
        info_path = FileSystems.join(path, "info")
        try:
            info = read_json(info_path)
        except (OSError, ValueError) as e:
            raise SkeletonError(f"{path}: not a precomputed skeleton directory "
                              f"({info_path}: {e})") from None
        if info.get("@type") != "neuroglancer_skeletons":
            raise SkeletonError(f"{info_path}: @type is {info.get('@type')!r}, "
                              "expected 'neuroglancer_skeletons'")
        sharding = info.get("sharding")
        if sharding is not None and sharding.get("@type") != "neuroglancer_uint64_sharded_v1":
            raise SkeletonError(f"{info_path}: unknown sharding {sharding.get('@type')!r}")
        return cls(path, info)

    @property
    def sharded(self) -> bool:
        return self.info.get("sharding") is not None

    @property
    def shards(self) -> ts.KvStore:
        if self._shards is None:
            self._shards = ts.KvStore.open({
                "driver": "neuroglancer_uint64_sharded", "base": kvstore_url(self.path),
                "metadata": self.info["sharding"]}).result()
        return self._shards

    def segment_ids(self) -> list[int]:
        """Every segment that has a skeleton here, sorted."""
        if self.sharded:
            return sorted(struct.unpack(">Q", key)[0] for key in self.shards.list().result())
        found = FileSystems.match([FileSystems.join(self.path, "*")])[0].metadata_list
        names = (_SEGMENT_FILE.match(m.path.rstrip("/").rsplit("/", 1)[-1]) for m in found)
        return sorted({int(name.group(1)) for name in names if name})

    def read(self, segment_id: int) -> Skeleton | None:
        """A segment's skeleton in nm (the info transform applied), or None if it has none."""
        data = self._read_bytes(segment_id)
        if data is None:
            return None
        attributes = self.info.get("vertex_attributes", [])
        self._check_size(segment_id, data, attributes)
        skeleton = Skeleton.from_precomputed(data, segid=segment_id, vertex_attributes=attributes)
        transform = np.asarray(self.info.get("transform", np.eye(3, 4).ravel()),
                               dtype=np.float64).reshape(3, 4)
        skeleton.vertices = skeleton.vertices @ transform[:, :3].T + transform[:, 3]
        return skeleton

    def _read_bytes(self, segment_id: int) -> bytes | None:
        if self.sharded:
            found = self.shards.read(struct.pack(">Q", segment_id)).result()
            return bytes(found.value) if found.state == "value" else None
        for name in (str(segment_id), f"{segment_id}.gz"):
            path = FileSystems.join(self.path, name)
            if FileSystems.exists(path):
                with FileSystems.open(path) as f:
                    return f.read()
        return None

    def _check_size(self, segment_id: int, data: bytes, attributes: list[dict]) -> None:
        """Fail clearly on a truncated file (the decoder would fail obscurely)."""
        if len(data) >= 8:
            vertices, edges = struct.unpack_from("<II", data)
            size = 8 + 12 * vertices + 8 * edges
            extra = sum(vertices * int(a["num_components"]) * np.dtype(a["data_type"]).itemsize
                        for a in attributes)
            if len(data) in (size, size + extra):
                return
            expected = f"{size} or {size + extra}"
        else:
            expected = "at least 8"
        raise SkeletonError(f"{self.path}: skeleton of segment {segment_id} has {len(data)} "
                          f"bytes, expected {expected}")
