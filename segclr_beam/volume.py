"""EM and segmentation volumes: open one at one resolution, read voxel boxes.

A volume is addressed in voxels at the embedding resolution, axes (x, y, z), as in
Neuroglancer. Reads outside the stored domain give zeros, so a window near the edge of the
dataset needs no special case downstream.

TensorStore reads every volume it can decode. Precomputed volumes as cloud-volume and igneous
write them are read with cloud-volume where TensorStore cannot: compresso and crackle chunks,
and local chunk files compressed by cloud-files (`NAME.gz`, its default for local paths; on GCS
it sets Content-Encoding instead, which TensorStore reads). The choice is made when the volume
is opened; `Volume.describe()` names it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Sequence

import numpy as np
import tensorstore as ts

DEFAULT_RESOLUTION = (32.0, 32.0, 33.0)
_SCHEMES = {"precomputed": "neuroglancer_precomputed", "zarr": "zarr", "zarr3": "zarr3", "n5": "n5"}
# Marker files that tell which driver a bare path holds, in the order they are tried.
_MARKERS = (("info", "neuroglancer_precomputed"), ("zarr.json", "zarr3"), (".zarray", "zarr"),
            ("attributes.json", "n5"))
TENSORSTORE, CLOUD_VOLUME = "tensorstore", "cloud-volume"
# Precomputed chunk encodings that only cloud-volume decodes.
CLOUD_VOLUME_ENCODINGS = ("compresso", "crackle")
_SCANNED_CHUNK_FILES = 64  # directory entries looked at for compressed chunk files


class VolumeError(ValueError):
    """A volume cannot be opened or does not fit the request; the message names it."""


@dataclasses.dataclass(frozen=True)
class Box:
    """A voxel box [start, stop) in (x, y, z)."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "start", tuple(int(v) for v in self.start))
        object.__setattr__(self, "stop", tuple(int(v) for v in self.stop))

    @classmethod
    def around(cls, center: Sequence[int], size: int | Sequence[int]) -> "Box":
        """The box of `size` voxels whose voxel index size // 2 is `center`."""
        size = np.broadcast_to(np.asarray(size, dtype=np.int64), (3,))
        start = np.asarray(center, dtype=np.int64) - size // 2
        return cls(tuple(start), tuple(start + size))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(max(0, b - a) for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def is_empty(self) -> bool:
        return self.size == 0

    def intersect(self, other: "Box") -> "Box":
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop))
        return Box(start, stop)

    def grow(self, margin: int) -> "Box":
        return Box(tuple(v - margin for v in self.start), tuple(v + margin for v in self.stop))

    def contains(self, point: Sequence[int]) -> bool:
        return all(a <= p < b for a, p, b in zip(self.start, point, self.stop))

    def slices(self, origin: Sequence[int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
        """Slices of this box inside an array whose voxel [0, 0, 0] is at `origin`."""
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, origin))

    def __str__(self) -> str:
        return f"[{','.join(map(str, self.start))} .. {','.join(map(str, self.stop))})"


class PendingRead:
    """A read in flight; `result()` gives the box as an (x, y, z) array with zeros outside.

    A checked read also finds the storage chunks absent in the box (`absent`, their
    origins, known once `result()` returned); they read as zeros like voxels outside.
    """

    def __init__(self, box: Box, inside: Box, dtype: np.dtype, future: Any | None, order: str,
                 checked: bool = False):
        self._box, self._inside, self._dtype, self._future = box, inside, dtype, future
        self._order, self._checked = order, checked
        self.absent: list[tuple[int, int, int]] = []

    def _inside_result(self) -> np.ndarray:
        if not self._checked:
            return np.asarray(self._future.result())
        data, self.absent = self._future.result()
        return data

    def result(self) -> np.ndarray:
        if self._inside == self._box:
            return self._inside_result()
        out = np.zeros(self._box.shape, dtype=self._dtype, order=self._order)
        if self._future is not None:
            out[self._inside.slices(self._box.start)] = self._inside_result()
        return out


class _TensorStoreReader:
    """A volume read by TensorStore, as a 3-D (x, y, z) view."""

    def __init__(self, spec: dict, name: str):
        self._spec, self._name, self._strict = spec, name, None
        self.store = _xyz_view(ts.open(spec, read=True).result(), name)
        self.bounds = Box(self.store.domain.inclusive_min, self.store.domain.exclusive_max)
        self.dtype = np.dtype(self.store.dtype.numpy_dtype)
        self.resolution = _units_nm(self.store)
        layout = self.store.chunk_layout
        self.chunks = tuple(layout.read_chunk.shape), tuple(layout.grid_origin)

    def read(self, box: Box, order: str) -> Any:
        return self.store[box.slices()].read(order=order)

    def read_checked(self, box: Box, order: str) -> "_CheckedRead":
        """Read `box`; the result is (array, origins of the storage chunks absent in it)."""
        if self._strict is None:
            spec = {**self._spec, "fill_missing_data_reads": False}
            self._strict = _xyz_view(ts.open(spec, read=True).result(), self._name)
        return _CheckedRead(self, box, order, self._strict[box.slices()].read(order=order))


class _CheckedRead:
    """A TensorStore read that fails on absent chunks; on failure, the absent chunks are
    found (one read per chunk, only then) and the box is read again with fill values."""

    def __init__(self, reader: _TensorStoreReader, box: Box, order: str, strict: Any):
        self._reader, self._box, self._order, self._strict = reader, box, order, strict

    def result(self) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        try:
            return np.asarray(self._strict.result()), []
        except ValueError as e:
            if "NOT_FOUND" not in str(e):
                raise
        reader = self._reader
        reads = [(origin, reader._strict[chunk.slices()].read())
                 for origin, chunk in chunk_boxes(self._box, *reader.chunks)]
        absent = [origin for origin, read in reads if _missing(read)]
        return np.asarray(reader.read(self._box, self._order).result()), absent


def _missing(read: Any) -> bool:
    """Whether a read of a store without fill values failed for an absent chunk."""
    try:
        read.result()
    except ValueError as e:
        if "NOT_FOUND" in str(e):
            return True
        raise
    return False


def chunk_boxes(box: Box, chunk: Sequence[int], origin: Sequence[int]
                ) -> list[tuple[tuple[int, int, int], Box]]:
    """(chunk origin, the part of `box` in that chunk) of every storage chunk `box` touches."""
    ranges = [range(o + (a - o) // c * c, b, c)
              for a, b, c, o in zip(box.start, box.stop, chunk, origin)]
    found = []
    for corner in itertools.product(*ranges):
        part = box.intersect(Box(corner, tuple(v + c for v, c in zip(corner, chunk))))
        found.append((tuple(int(v) for v in corner), part))
    return found


class _CloudVolumeReader:
    """A precomputed volume read by cloud-volume, one read at a time on a thread of its own
    (reads of different volumes still overlap, as TensorStore's do)."""

    def __init__(self, spec: dict, name: str):
        from cloudvolume import CloudVolume

        if "transform" in spec:
            raise VolumeError(f"{name}: a transform is not supported for volumes read by "
                              "cloud-volume (compresso, crackle or gzip-compressed chunk files)")
        # parallel=1: no process pool inside a Beam worker; fill_missing: absent chunks are
        # background, as in TensorStore; no cache: reads are already one per block.
        self._path, self._strict = _cloud_path(spec), None
        self._volume = CloudVolume(self._path, mip=spec["scale_index"], bounded=True,
                                   fill_missing=True, parallel=1, progress=False, cache=False)
        if self._volume.num_channels != 1:
            raise VolumeError(f"{name}: expected one channel, found {self._volume.num_channels}")
        bounds = self._volume.bounds
        self.bounds = Box(bounds.minpt, bounds.maxpt)
        self.dtype = np.dtype(self._volume.dtype)
        self.resolution = tuple(float(r) for r in self._volume.resolution)
        self.chunks = (tuple(int(c) for c in self._volume.chunk_size),
                       tuple(int(o) for o in self._volume.voxel_offset))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"cloud-volume-{name}")

    def read(self, box: Box, order: str) -> Future:
        return self._thread.submit(self._read, self._volume, box, order)

    def read_checked(self, box: Box, order: str) -> Future:
        """Read `box`; the result is (array, origins of the storage chunks absent in it)."""
        return self._thread.submit(self._read_checked, box, order)

    def _read_checked(self, box: Box, order: str) -> tuple[np.ndarray, list]:
        from cloudvolume import CloudVolume
        from cloudvolume.exceptions import EmptyVolumeException

        if self._strict is None:
            self._strict = CloudVolume(self._path, mip=self._volume.mip, bounded=True,
                                       fill_missing=False, parallel=1, progress=False,
                                       cache=False)
        try:
            return self._read(self._strict, box, order), []
        except EmptyVolumeException:
            pass
        absent = []
        for origin, chunk in chunk_boxes(box, *self.chunks):
            try:
                self._read(self._strict, chunk, order)
            except EmptyVolumeException:
                absent.append(origin)
        return self._read(self._volume, box, order), absent

    @staticmethod
    def _read(volume, box: Box, order: str) -> np.ndarray:
        x, y, z = (slice(a, b) for a, b in zip(box.start, box.stop))
        return np.array(volume[x, y, z][..., 0], order=order)


_READERS = {TENSORSTORE: _TensorStoreReader, CLOUD_VOLUME: _CloudVolumeReader}


@dataclasses.dataclass
class Volume:
    """One opened volume. Pickles as its spec and reader, so Beam workers reopen it lazily."""

    name: str
    spec: dict
    resolution: tuple[float, float, float]
    bounds: Box
    dtype: np.dtype
    reader: str = TENSORSTORE  # which library reads it: TENSORSTORE or CLOUD_VOLUME
    kind: str | None = None    # what its metadata says it holds (precomputed "type"), if it says
    _store: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    @property
    def store(self) -> _TensorStoreReader | _CloudVolumeReader:
        """The opened reader (opened on first use)."""
        if self._store is None:
            self._store = _READERS[self.reader](self.spec, self.name)
        return self._store

    @property
    def chunks(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """The storage chunk shape and the origin of the chunk grid, (x, y, z) voxels."""
        return self.store.chunks

    def read_async(self, box: Box, order: str = "C", check_absent: bool = False) -> PendingRead:
        """Start reading `box`; voxels outside the volume come back as zeros.

        order="F" lays the (x, y, z) array out so that its transpose, (z, y, x) as the
        model takes it, is C-contiguous without a copy. With `check_absent` the read also
        tells which storage chunks inside the volume are absent (`PendingRead.absent`),
        at no cost while none is.
        """
        inside = box.intersect(self.bounds)
        future = None
        if not inside.is_empty():
            future = (self.store.read_checked if check_absent else self.store.read)(inside, order)
        return PendingRead(box, inside, self.dtype, future, order, check_absent)

    def read(self, box: Box) -> np.ndarray:
        return self.read_async(box).result()

    def describe(self) -> str:
        res = " x ".join(f"{r:g}" for r in self.resolution)
        return f"{self.name}: {self.dtype} at {res} nm, voxels {self.bounds}, read by {self.reader}"


class AbsentChunksError(VolumeError):
    """More storage chunks of a volume are absent than the run tolerates."""


@dataclasses.dataclass
class AbsentChunks:
    """The absent storage chunks of one volume that a worker has seen, each counted once.

    Absent chunks read as zeros, like background: a damaged volume would give an output
    that looks complete. Past `limit` chunks, `add` raises AbsentChunksError naming the
    volume and the first chunks.
    """

    volume: str
    limit: int
    seen: set = dataclasses.field(default_factory=set)

    def add(self, origins: Iterable[tuple[int, int, int]]) -> int:
        """Record absent chunks by origin; returns how many were new."""
        before = len(self.seen)
        self.seen.update(tuple(o) for o in origins)
        if len(self.seen) > self.limit:
            first = ", ".join(str(o) for o in sorted(self.seen)[:5])
            raise AbsentChunksError(
                f"{self.volume}: {len(self.seen)} storage chunks inside the box are absent "
                f"(chunk origins {first}{', ...' if len(self.seen) > 5 else ''}), more than "
                f"the {self.limit} tolerated; they would read as zeros. Repair the volume, or "
                "accept them with --max-absent-chunks (e.g. a volume written without its "
                "all-background chunks)")
        return len(self.seen) - before


def parse_source(source: str | dict) -> dict:
    """A TensorStore spec from a JSON object, a JSON file, or a URL shorthand.

    Shorthands: `precomputed://`, `zarr://`, `zarr3://`, `n5://` followed by a path or gs://
    URL; a bare path or gs:// URL is probed for the marker file of each driver.
    """
    if isinstance(source, dict):
        return dict(source)
    text = source.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise VolumeError(f"malformed TensorStore spec {text[:80]!r}: {e}") from None
    if text.endswith(".json") and os.path.isfile(text):
        try:
            with open(text) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise VolumeError(f"malformed TensorStore spec in {text}: {e}") from None
    scheme, sep, rest = text.partition("://")
    if sep and scheme in _SCHEMES:
        return {"driver": _SCHEMES[scheme], "kvstore": kvstore_url(rest)}
    kvstore = kvstore_url(text)
    try:
        kv = ts.KvStore.open(kvstore).result()
        for marker, driver in _MARKERS:
            if kv.read(marker).result().state == "value":
                return {"driver": driver, "kvstore": kvstore}
    except ValueError as e:
        raise VolumeError(f"cannot read {text}: {e}") from None
    raise VolumeError(
        f"no volume at {text}: found none of {', '.join(m for m, _ in _MARKERS)}")


def kvstore_url(path: str) -> str:
    """A TensorStore kvstore URL for a local path or a gs:// URL, with a trailing slash."""
    if "://" in path:
        return path.rstrip("/") + "/"
    return "file://" + os.path.abspath(path).rstrip("/") + "/"


def _xyz_view(store: ts.TensorStore, name: str) -> ts.TensorStore:
    """The store as a 3-D (x, y, z) view: axes by label if labelled, a size-1 channel dropped."""
    labels = store.domain.labels
    if {"x", "y", "z"} <= set(labels):
        store = store[ts.d["x", "y", "z"].transpose[:3]]
    while store.rank > 3:
        last = store.domain[store.rank - 1]
        if last.size != 1:
            raise VolumeError(f"{name}: expected one channel, found {last.size} on axis {last.label!r}")
        store = store[..., last.inclusive_min]
    if store.rank != 3:
        raise VolumeError(f"{name}: expected a 3-D volume, found rank {store.rank}")
    return store


def _precomputed_info(spec: dict, name: str) -> dict:
    """The `info` file of a precomputed volume."""
    found = ts.KvStore.open(spec["kvstore"]).result().read("info").result()
    if found.state != "value":
        raise VolumeError(f"{name}: no precomputed info file at {spec['kvstore']}")
    try:
        return json.loads(bytes(found.value))
    except json.JSONDecodeError as e:
        raise VolumeError(f"{name}: malformed precomputed info at {spec['kvstore']}: {e}") from None


def _precomputed_scale(info: dict, name: str, resolution: Sequence[float]) -> int:
    """The index of the scale of a precomputed volume at `resolution`."""
    available = [tuple(float(v) for v in s["resolution"]) for s in info.get("scales", [])]
    for index, res in enumerate(available):
        if np.allclose(res, resolution, rtol=1e-3):
            return index
    raise VolumeError(
        f"{name}: no scale at resolution {_fmt(resolution)} nm; it has "
        + ", ".join(_fmt(r) for r in available))


def _precomputed_reader(spec: dict, info: dict, name: str) -> str:
    """CLOUD_VOLUME where the chosen scale holds chunks TensorStore cannot decode: compresso
    or crackle, or local chunk files compressed by cloud-files; TENSORSTORE otherwise."""
    scales = info.get("scales", [])
    if not 0 <= spec["scale_index"] < len(scales):
        raise VolumeError(f"{name}: scale_index {spec['scale_index']} outside the "
                          f"{len(scales)} scales of {spec['kvstore']}")
    scale = scales[spec["scale_index"]]
    if scale.get("encoding") in CLOUD_VOLUME_ENCODINGS:
        return CLOUD_VOLUME
    url = ts.KvStore.open(spec["kvstore"]).result().url
    if url.startswith("file://") and _holds_compressed_files(
            os.path.join(url[len("file://"):], scale["key"])):
        return CLOUD_VOLUME
    return TENSORSTORE


def _holds_compressed_files(directory: str) -> bool:
    """Whether the first files of a local chunk directory carry a cloud-files compression
    suffix (cloud-volume writes every chunk of a scale with the same compression)."""
    from cloudfiles.interfaces import COMPRESSION_EXTENSIONS

    try:
        with os.scandir(directory) as entries:
            for _, entry in zip(range(_SCANNED_CHUNK_FILES), entries):
                if entry.name.endswith(COMPRESSION_EXTENSIONS):
                    return True
    except (FileNotFoundError, NotADirectoryError):
        pass  # no chunk written yet: every voxel is background, TensorStore reads it so
    return False


def _cloud_path(spec: dict) -> str:
    """cloud-volume's path of a precomputed spec's kvstore (file:// or gs:// URL)."""
    url = ts.KvStore.open(spec["kvstore"]).result().url.rstrip("/")
    if spec.get("path"):
        url += "/" + spec["path"].strip("/")
    return url


def _where(volume: Volume) -> str:
    kvstore = volume.spec.get("kvstore")
    return kvstore if isinstance(kvstore, str) else json.dumps(volume.spec)[:200]


def _fmt(res: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in res)


def _units_nm(store: ts.TensorStore) -> tuple[float, ...] | None:
    units = store.dimension_units[:3]
    if any(u is None for u in units):
        return None
    scale = {"nm": 1.0, "um": 1e3, "µm": 1e3, "m": 1e9}
    try:
        return tuple(u.multiplier * scale[u.base_unit] for u in units)
    except KeyError:
        return None


def open_volume(source: str | dict, name: str,
                resolution: Sequence[float] = DEFAULT_RESOLUTION) -> Volume:
    """Open `source` at `resolution` (nm, x y z) and check that it offers it."""
    try:
        spec = parse_source(source)
    except VolumeError as e:
        raise VolumeError(f"{name}: {e}") from None
    if not isinstance(spec, dict) or "driver" not in spec:
        raise VolumeError(f"{name}: malformed TensorStore spec (no 'driver'): {spec!r}")
    try:
        ts.Spec(spec)  # the spec's shape, before anything is opened
    except ValueError as e:  # TensorStore's message names the member
        raise VolumeError(f"{name}: malformed TensorStore spec {json.dumps(spec)[:200]}: {e}"
                          ) from None
    resolution = tuple(float(v) for v in resolution)
    reader = TENSORSTORE
    kind = None
    if spec["driver"] == "neuroglancer_precomputed":
        info = _precomputed_info(spec, name)
        kind = info.get("type")
        if "scale_index" not in spec:
            spec = {**spec, "scale_index": _precomputed_scale(info, name, resolution)}
        reader = _precomputed_reader(spec, info, name)
    try:
        store = _READERS[reader](spec, name)
    except VolumeError:
        raise
    except ValueError as e:
        raise VolumeError(f"{name}: cannot open {json.dumps(spec)}: {e}") from None
    found = store.resolution
    if found is None:
        logging.warning("%s has no voxel size in its metadata; taking it as %s nm", name,
                        _fmt(resolution))
    elif not np.allclose(found, resolution, rtol=1e-3):
        raise VolumeError(f"{name}: resolution {_fmt(found)} nm, requested {_fmt(resolution)} nm")
    volume = Volume(name, spec, resolution, store.bounds, store.dtype, reader, kind, store)
    logging.info("%s", volume.describe())
    return volume


def open_volumes(em_source: str | dict, segmentation_source: str | dict,
                 resolution: Sequence[float] = DEFAULT_RESOLUTION) -> tuple[Volume, Volume]:
    """Open the EM and segmentation pair and check dtypes and overlap."""
    em = open_volume(em_source, "EM", resolution)
    segmentation = open_volume(segmentation_source, "segmentation", resolution)
    if em.dtype != np.uint8:
        raise VolumeError(f"EM: dtype must be uint8, found {em.dtype}")
    if not np.issubdtype(segmentation.dtype, np.integer):
        raise VolumeError(f"segmentation: dtype must be an integer type, found {segmentation.dtype}")
    if segmentation.spec == em.spec:
        raise VolumeError("segmentation: is the EM volume itself; give the segmentation's path")
    if segmentation.kind == "image":
        raise VolumeError(f"segmentation: {_where(segmentation)} is an image volume (its info "
                          "says type \"image\"), not a segmentation")
    if em.bounds.intersect(segmentation.bounds).is_empty():
        raise VolumeError(
            f"EM voxels {em.bounds} and segmentation voxels {segmentation.bounds} do not overlap")
    return em, segmentation
