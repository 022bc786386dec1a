"""Positive pairs and the two augmented views of each, cut like inference cutouts.

A pair table (sharded TFRecord of tf.train.Example in the schema of the published SegCLR
training tables) holds two nearby skeleton nodes of one segment per record. Training sees
each pair as two masked-EM cutouts, each with its own random shift of the centre, flips,
axis permutation and gray-value change. Pairs of a window of consecutive steps are cut
together, grouped by block, so a block is read once for all views falling in it.

A batch is a pure function of (seed, step): pairs are shuffled per epoch, and the random
draws of a window come from a stream keyed by the window, so a resumed run sees exactly the
batches an uninterrupted run sees, whatever the thread timing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import os
import shutil
import tempfile
import threading
from typing import Iterator

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from segclr_beam.cutouts import CutoutReader, CutoutStats, block_of
from segclr_beam.points import Point
from segclr_beam.records import PAIR_SCHEMA, PAIR_TABLE_PREFIX
from segclr_beam.volume import Volume

# The schema of a pair record, as tf.io.parse_example takes it (records.PAIR_SCHEMA).
PAIR_FEATURES = {key: tf.io.FixedLenFeature(list(shape), tf.as_dtype(dtype))
                 for key, (shape, dtype) in PAIR_SCHEMA.items()}
# Gray-value augmentation of the SegCLR training (tuned on h01): x * a + c with a in
# 1 +- GRAY_SCALE and c in +- GRAY_OFFSET, clipped to [0, 1], then x ** 2^u, u in +- GAMMA_LOG2.
GRAY_SCALE = 0.25
GRAY_OFFSET = 0.25
GAMMA_LOG2 = 1.0
DEFAULT_MAX_SHIFT = 4
# Pairs cut together (grouped by block); bounds the memory of one window of views.
WINDOW_PAIRS = 128
_ORDER, _AUGMENT = 0, 1  # independent random streams


class PairTableError(ValueError):
    """A pair table cannot be read or does not fit the volumes; the message names the file."""


@dataclasses.dataclass(frozen=True)
class PairTable:
    """All pairs of a table, in file order."""

    files: tuple[str, ...]
    centers: np.ndarray  # int64 [N, 2, 3]: the two centres, voxels (x, y, z)
    segment_ids: np.ndarray  # uint64 [N]
    distance_nm: np.ndarray  # int64 [N]: separation along the skeleton
    vol_name: str
    label_volume_name: str

    def __len__(self) -> int:
        return len(self.segment_ids)

    @property
    def name(self) -> str:
        """The table's files, as an error message names them."""
        more = f" and {len(self.files) - 1} more files" if len(self.files) > 1 else ""
        return f"{self.files[0]}{more}"

    def describe(self) -> dict:
        return {"files": list(self.files), "pairs": len(self), "vol_name": self.vol_name,
                "label_volume_name": self.label_volume_name}


def pair_files(pattern: str) -> list[str]:
    """The files of a pair table: a glob, a prefix NAME.tfrecord of NAME.tfrecord-*-of-*, or
    a directory holding PAIR_TABLE_PREFIX-*-of-*."""
    patterns = [pattern] if glob.has_magic(pattern) else [
        pattern.rstrip("/") + f"/{PAIR_TABLE_PREFIX}-*-of-*", pattern, pattern + "-*-of-*"]
    for candidate in patterns:
        found = [m.path for m in FileSystems.match([candidate])[0].metadata_list]
        if found:
            return sorted(found)
    raise PairTableError(f"pair table {pattern!r}: no files match it (nor {pattern}-*-of-*, "
                         f"nor {PAIR_TABLE_PREFIX}-*-of-* in it)")


def _read_file(path: str) -> dict[str, np.ndarray]:
    """Every record of one TFRecord file, parsed; remote files are read through Beam."""
    with tempfile.TemporaryDirectory(prefix="segclr-pairs-") as tmp:
        local = path
        if FileSystems.get_scheme(path) is not None:
            local = os.path.join(tmp, "pairs.tfrecord")
            with FileSystems.open(path) as fin, open(local, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
        dataset = tf.data.TFRecordDataset(local).batch(4096).map(
            lambda records: tf.io.parse_example(records, PAIR_FEATURES))
        parts = collections.defaultdict(list)
        try:
            for batch in dataset:
                for key, value in batch.items():
                    parts[key].append(value.numpy())
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
            raise PairTableError(f"pair table file {path}: {e.message}") from None
    return {key: np.concatenate(values) for key, values in parts.items()}


def read_pair_table(pattern: str) -> PairTable:
    """Read and check every pair of the table at `pattern` (local or any Beam filesystem).

    Raises PairTableError naming the file for a record off the schema, a pair whose two
    centres lie on different segments, or a table that names several volumes.
    """
    files = pair_files(pattern)
    columns = [_read_file(path) for path in files]
    for path, column in zip(files, columns):
        if column:
            differ = np.flatnonzero(column["skeleton_id-0"] != column["skeleton_id-1"])
            if len(differ):
                raise PairTableError(
                    f"pair table file {path}: record {differ[0]} pairs segments "
                    f"{column['skeleton_id-0'][differ[0], 0]} and "
                    f"{column['skeleton_id-1'][differ[0], 0]}; a positive pair lies on one")
    columns = [c for c in columns if c]
    if not columns:
        raise PairTableError(f"pair table {pattern!r}: its {len(files)} files hold no pairs")
    table = {key: np.concatenate([c[key] for c in columns]) for key in PAIR_FEATURES}
    volumes = set(zip(table["vol_name"][:, 0], table["label_volume_name"][:, 0]))
    if len(volumes) > 1:
        raise PairTableError(f"pair table {pattern!r} names {len(volumes)} volume pairs "
                             f"(vol_name, label_volume_name) {sorted(volumes)[:3]}; training "
                             "reads one EM and one segmentation")
    (vol_name, label_volume_name), = volumes
    return PairTable(
        files=tuple(files),
        centers=np.stack([table["center-0"][:, 0], table["center-1"][:, 0]], axis=1),
        segment_ids=table["skeleton_id-0"][:, 0].view(np.uint64),
        distance_nm=table["distance"][:, 0],
        vol_name=vol_name.decode(), label_volume_name=label_volume_name.decode())


def check_inside(table: PairTable, em: Volume, segmentation: Volume) -> None:
    """Raise PairTableError for a centre outside both volumes: table and volumes disagree."""
    inside = np.zeros(table.centers.shape[:2], dtype=bool)
    for bounds in (em.bounds, segmentation.bounds):
        inside |= np.all((table.centers >= bounds.start) & (table.centers < bounds.stop), axis=-1)
    outside = np.argwhere(~inside)
    if len(outside):
        pair, view = outside[0]
        raise PairTableError(
            f"pair table {table.name}: {len(outside)} centres lie outside both the EM "
            f"{em.bounds} and the segmentation {segmentation.bounds}, the first center-{view} "
            f"{tuple(int(v) for v in table.centers[pair, view])} of pair {pair} (segment "
            f"{table.segment_ids[pair]}); are the resolution and offset those of the table?")


@dataclasses.dataclass
class ViewBatch:
    """The two augmented views of a batch of pairs, for one training step."""

    step: int
    pairs: np.ndarray  # int64 [B]: indices into the pair table
    views: np.ndarray  # uint8 [B, 2, s, s, s]: masked EM, flipped and permuted
    gray: np.ndarray  # float32 [B, 2, 3]: a, c, u of the gray-value change of each view


def orient(cutout: np.ndarray, flips: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """`cutout` flipped along the axes where `flips` is set, then its axes permuted (a view)."""
    flipped = cutout[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.transpose(flipped, permutation)


class PairViews:
    """Batches of `batch_size` pairs, both views cut from the volumes and augmented.

    Views of `window_steps` consecutive steps are cut together: their (shifted) centres are
    grouped by block and each group is cut from one read (or per window, whichever
    decodes less, as CutoutReader decides). `stats` sums the reads of all windows.
    """

    def __init__(self, table: PairTable, em: Volume, segmentation: Volume, cutout_size: int,
                 batch_size: int, seed: int = 0, max_shift: int = DEFAULT_MAX_SHIFT,
                 block_size: int = 256):
        check_inside(table, em, segmentation)
        self.table, self.em, self.segmentation = table, em, segmentation
        self.cutout_size, self.batch_size = cutout_size, batch_size
        self.seed, self.max_shift, self.block_size = seed, max_shift, block_size
        self.window_steps = max(1, WINDOW_PAIRS // batch_size)
        self.stats = CutoutStats()
        self._lock = threading.Lock()
        self._orders: dict[int, np.ndarray] = {}
        _ = em.store, segmentation.store  # open once, before threads share the volumes

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                rng = np.random.default_rng([self.seed, _ORDER, epoch])
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = rng.permutation(len(self.table))
            return self._orders[epoch]

    def pair_indices(self, step: int) -> np.ndarray:
        """The pairs of `step`: the next batch_size of the epoch's shuffled order."""
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, len(self.table))
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)], np.int64)

    def window(self, index: int) -> list[ViewBatch]:
        """The batches of steps index * window_steps .. (index + 1) * window_steps - 1."""
        steps = range(index * self.window_steps, (index + 1) * self.window_steps)
        pairs = np.concatenate([self.pair_indices(s) for s in steps])
        n, size = len(pairs), self.cutout_size
        rng = np.random.default_rng([self.seed, _AUGMENT, index])
        shift = rng.integers(-self.max_shift, self.max_shift + 1, size=(n, 2, 3))
        flips = rng.random((n, 2, 3)) < 0.5
        permutations = np.argsort(rng.random((n, 2, 3)), axis=-1)
        gray = np.stack([1 + rng.uniform(-GRAY_SCALE, GRAY_SCALE, (n, 2)),
                         rng.uniform(-GRAY_OFFSET, GRAY_OFFSET, (n, 2)),
                         rng.uniform(-GAMMA_LOG2, GAMMA_LOG2, (n, 2))], axis=-1)
        bounds = self.segmentation.bounds
        centers = np.clip(self.table.centers[pairs] + shift, bounds.start,
                          np.asarray(bounds.stop) - 1)
        groups = collections.defaultdict(list)
        for i, pair in enumerate(pairs):
            for view in (0, 1):
                point = Point(int(self.table.segment_ids[pair]), 2 * i + view,
                              *(int(v) for v in centers[i, view]))
                groups[block_of(point, self.block_size)].append(point)
        views = np.empty((n, 2, size, size, size), dtype=np.uint8)
        reader = CutoutReader(self.em, self.segmentation, size)
        for group in groups.values():
            for point, cutout in reader.cutouts(group):
                i, view = divmod(point.node_id, 2)
                views[i, view] = orient(cutout, flips[i, view], permutations[i, view])
        with self._lock:
            for field in dataclasses.fields(CutoutStats):
                setattr(self.stats, field.name,
                        getattr(self.stats, field.name) + getattr(reader.stats, field.name))
        if reader.stats.segment_absent == reader.stats.cutouts:
            raise PairTableError(
                f"pair table {self.table.name}: none of the {2 * n} views of steps "
                f"{steps.start}..{steps.stop - 1} finds its segment in its window of the "
                f"segmentation; are the segment ids and volumes those of the table?")
        b = self.batch_size
        return [ViewBatch(step, pairs[k * b:(k + 1) * b], views[k * b:(k + 1) * b],
                          gray[k * b:(k + 1) * b].astype(np.float32))
                for k, step in enumerate(steps)]

    def batches(self, start: int, stop: int, threads: int = 2,
                prefetch: int = 2) -> Iterator[ViewBatch]:
        """The batches of steps start .. stop - 1, in order, cut by `threads` threads that
        keep `prefetch` windows ready beyond the ones being cut."""
        if start >= stop:
            return
        windows = iter(range(start // self.window_steps, (stop - 1) // self.window_steps + 1))
        pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="segclr-views")
        pending: collections.deque = collections.deque()
        try:
            for index in windows:
                pending.append(pool.submit(self.window, index))
                if len(pending) >= threads + prefetch:
                    break
            while pending:
                batches = pending.popleft().result()
                for index in windows:
                    pending.append(pool.submit(self.window, index))
                    break
                yield from (batch for batch in batches if start <= batch.step < stop)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
