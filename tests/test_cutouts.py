"""Cutouts against independent TensorStore window reads, bad points, dense blocks, Beam."""

from __future__ import annotations

import collections
import hashlib
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorstore as ts
from apache_beam.testing.util import assert_that, equal_to

from segclr_beam.cutouts import (CutoutReader, CutoutStats, MakeCutouts, PointOutsideError,
                                 SegmentAbsentError,
                                 block_of, cut_block, group_key, windows_box)
from segclr_beam.records import Point
from segclr_beam.volume import Box, open_volumes


def open_store(path) -> ts.TensorStore:
    return ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{path}/"}).result()


def reference_cutout(em: ts.TensorStore, segmentation: ts.TensorStore, point: Point,
                     size: int) -> np.ndarray:
    """The window read straight from the stores ([x, y, z, channel]), zero-padded, masked."""
    center = np.array([point.x, point.y, point.z])
    start = center - size // 2
    arrays = []
    for store in (em, segmentation):
        window = np.zeros((size,) * 3, dtype=store.dtype.numpy_dtype)
        lo = np.maximum(start, store.domain.inclusive_min[:3])
        hi = np.minimum(start + size, store.domain.exclusive_max[:3])
        if (lo < hi).all():
            data = store[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2], 0].read().result()
            window[tuple(slice(a, b) for a, b in zip(lo - start, hi - start))] = data
        arrays.append(window)
    em_window, segmentation_window = arrays
    masked = np.where(segmentation_window == point.segment_id, em_window, 0)
    return masked.transpose(2, 1, 0)


def random_points(labels: np.ndarray, n: int, seed: int, origin=(0, 0, 0)) -> list[Point]:
    """`n` random labelled voxels of `labels` ([x, y, z] whose voxel 0 is at `origin`)."""
    voxels = np.argwhere(labels != 0)
    picked = voxels[np.random.default_rng(seed).choice(len(voxels), n, replace=False)]
    return [Point(int(labels[tuple(v)]), i, *(int(a) for a in v + origin))
            for i, v in enumerate(picked)]


def labelled_point(labels: np.ndarray, near, node_id: int) -> Point:
    """A point at the labelled voxel nearest `near`."""
    labelled = np.argwhere(labels != 0)
    x, y, z = (int(v) for v in labelled[np.abs(labelled - near).sum(axis=1).argmin()])
    return Point(int(labels[x, y, z]), node_id, x, y, z)


@pytest.fixture(scope="module")
def dataset(synthetic_dataset):
    em, segmentation = open_volumes(synthetic_dataset.em, synthetic_dataset.segmentation)
    stores = open_store(synthetic_dataset.em), open_store(synthetic_dataset.segmentation)
    labels = stores[1][..., 0].read().result()
    corners = [labelled_point(labels, corner, 1000 + i)
               for i, corner in enumerate([(0, 0, 0), (191, 191, 127), (0, 100, 127)])]
    points = random_points(labels, 24, seed=1) + corners
    return em, segmentation, stores, labels, points


def check_against_reference(cutouts, stores, size):
    for point, cutout in cutouts:
        assert cutout.dtype == np.uint8 and cutout.shape == (size,) * 3
        assert cutout.flags.c_contiguous
        np.testing.assert_array_equal(cutout, reference_cutout(*stores, point, size),
                                      err_msg=str(point))


@pytest.mark.parametrize("size, block_size", [(129, 64), (33, 64)])
def test_cutouts_equal_independent_reads(dataset, size, block_size):
    em, segmentation, stores, _, points = dataset
    reader = CutoutReader(em, segmentation, size)
    groups = collections.defaultdict(list)
    for point in points:
        groups[block_of(point, block_size)].append(point)
    cutouts = [c for group in groups.values() for c in reader.cutouts(group)]
    assert sorted(p for p, _ in cutouts) == sorted(points)
    check_against_reference(cutouts, stores, size)
    assert reader.stats.cutouts == len(points)
    assert reader.stats.segment_absent == 0
    assert reader.stats.blocks_read >= 1
    if size == 129:  # every window pokes out of the 128-voxel-deep volume
        assert all(Box.around(p[2:], size).intersect(em.bounds).size < size ** 3 for p in points)


def test_strategy_follows_bytes_read(dataset):
    em, segmentation, stores, labels, _ = dataset
    far = [labelled_point(labels, xyz, i) for i, xyz in enumerate([(10, 10, 10), (180, 180, 110)])]
    reader = CutoutReader(em, segmentation, 33)
    check_against_reference(list(reader.cutouts(far)), stores, 33)
    assert (reader.stats.windows_read, reader.stats.blocks_read) == (2, 0)
    near = [labelled_point(labels, xyz, i)
            for i, xyz in enumerate([(100, 100, 60), (110, 95, 64), (96, 104, 58)])]
    check_against_reference(list(reader.cutouts(near)), stores, 33)
    assert (reader.stats.windows_read, reader.stats.blocks_read) == (2, 1)
    # Bytes decoded: voxels inside the volume of what was read, times 1 (EM) + 8 (seg).
    boxes = [Box.around(p[2:], 33).intersect(em.bounds) for p in far]
    boxes.append(windows_box(near, 33).intersect(em.bounds))
    assert boxes[-1].size < 3 * 33 ** 3 < windows_box(far, 33).intersect(em.bounds).size
    assert reader.stats.bytes_decoded == sum(box.size for box in boxes) * (1 + 8)
    # Whole chunks (64^3 in the synthetic volumes) holding those boxes.
    chunks = sum(np.prod([-(-b // 64) - a // 64 for a, b in zip(box.start, box.stop)])
                 for box in boxes)
    assert reader.stats.chunk_bytes_decoded == chunks * 64 ** 3 * (1 + 8)


def test_point_outside_both_volumes_fails_before_reading(dataset):
    em, segmentation, *_ = dataset
    reader = CutoutReader(em, segmentation)
    points = [Point(5, 1, 10, 10, 10), Point(123, 7, -300, 5, 5)]
    with pytest.raises(PointOutsideError,
                       match=r"segment 123, node 7\) at voxel \(-300, 5, 5\) lies outside both"):
        list(reader.cutouts(points))
    assert reader.stats.bytes_decoded == 0 and reader.stats.cutouts == 0


def test_absent_segment_gives_zeros_and_is_counted(dataset):
    em, segmentation, stores, labels, _ = dataset
    # A thin axon far from (150, 150, 100): in the block that is read, but not in the window.
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    axon = ids[np.argmin(counts)]
    axon_voxels = np.argwhere(labels == axon)
    far_from = np.array([150, 150, 100])
    assert np.abs(axon_voxels - far_from).max(axis=1).min() > 16
    x, y, z = (int(v) for v in axon_voxels[0])
    points = [Point(int(axon), 1, x, y, z),                       # present
              Point(int(axon), 2, *far_from.tolist()),            # in the block, not the window
              Point(987654321, 3, 100, 100, 60),                  # nowhere in the volume
              Point(0, 4, 100, 100, 60)]                          # background is no segment
    box = windows_box(points[:2], 33).intersect(em.bounds)
    cutouts = dict(cut_block(points, box, em.read(box), segmentation.read(box), 33,
                             stats := CutoutStats()))
    check_against_reference([(points[0], cutouts[points[0]])], stores, 33)
    for point in points[1:]:
        assert not cutouts[point].any(), point
    assert stats.segment_absent == 3 and stats.cutouts == 4
    # The reader refuses such points, naming them, or leaves them out and counts them.
    with pytest.raises(SegmentAbsentError, match=r"3 point\(s\) whose segment does not occur"
                       r".*segment 987654321 node 3 at voxel \(100, 100, 60\)"):
        list(CutoutReader(em, segmentation, 33).cutouts(points))
    reader = CutoutReader(em, segmentation, 33, skip_absent=True)
    assert [p for p, _ in reader.cutouts(points)] == [points[0]]
    assert reader.stats.segment_absent == 3 and reader.stats.cutouts == 1


def test_cut_block_axis_order_and_box_offset():
    box = Box((10, 20, 30), (14, 25, 31))                # 4 x 5 x 1 voxels at an offset
    em = np.arange(20, dtype=np.uint8).reshape(4, 5, 1) + 1
    segmentation = np.full((4, 5, 1), 2**63 + 5, dtype=np.uint64)
    segmentation[3, 4, 0] = 7
    point = Point(2**63 + 5, 0, 11, 21, 30)
    [(got, cutout)] = list(cut_block([point], box, em, segmentation, cutout_size=3))
    assert got == point
    # cutout[z, y, x] is voxel (10 + x, 20 + y, 29 + z); z = 29 and z = 31 are outside the box.
    expected = np.zeros((3, 3, 3), np.uint8)
    expected[1] = em[0:3, 0:3, 0].T
    np.testing.assert_array_equal(cutout, expected)
    corner = Point(7, 1, 13, 24, 30)
    [(_, cutout)] = list(cut_block([corner], box, em, segmentation, cutout_size=3))
    assert cutout[1, 1, 1] == em[3, 4, 0] and np.count_nonzero(cutout) == 1
    with pytest.raises(ValueError, match="do not match box"):
        list(cut_block([point], box, em[:3], segmentation, cutout_size=3))


def write_precomputed(path, array: np.ndarray, offset) -> str:
    segmentation = array.dtype == np.uint64
    store = ts.open({
        "driver": "neuroglancer_precomputed", "kvstore": f"file://{path}/", "create": True,
        "store_data_equal_to_fill_value": True,  # every chunk stored, none absent
        "multiscale_metadata": {"type": "segmentation" if segmentation else "image",
                                "data_type": array.dtype.name, "num_channels": 1},
        "scale_metadata": {"size": list(array.shape), "resolution": [32, 32, 33],
                           "voxel_offset": list(offset), "chunk_size": [16, 16, 16],
                           "encoding": "compressed_segmentation" if segmentation else "jpeg"},
    }).result()
    store[..., 0].write(array).result()
    return str(path)


def test_volumes_with_offsets_and_different_bounds(tmp_path):
    rng = np.random.default_rng(3)
    labels = (rng.integers(0, 3, (6, 5, 4)).repeat(8, 0).repeat(8, 1).repeat(9, 2)
              .astype(np.uint64) * (2**40 + 1))[:45]           # 45 x 40 x 36 voxels
    em_array = rng.integers(1, 255, (40, 40, 40), dtype=np.uint8)
    seg_path = write_precomputed(tmp_path / "seg", labels, offset=(100, 50, 0))
    em_path = write_precomputed(tmp_path / "em", em_array, offset=(108, 50, 4))
    em, segmentation = open_volumes(em_path, seg_path)
    stores = open_store(em_path), open_store(seg_path)
    points = random_points(labels, 12, seed=4, origin=(100, 50, 0))
    points += [Point(int(labels[0, 0, 0]), 100, 100, 50, 0),      # inside seg, outside EM
               Point(int(2**40 + 1), 101, 147, 89, 43)]           # inside EM, outside seg
    for size in (9, 25):
        reader = CutoutReader(em, segmentation, size, skip_absent=True)
        cutouts = list(reader.cutouts(points)) + list(reader.cutouts(points[:2]))
        check_against_reference(cutouts, stores, size)
        assert reader.stats.segment_absent == (size == 9)  # node 101's window misses it
    with pytest.raises(PointOutsideError):
        list(reader.cutouts([Point(1, 1, 99, 50, 0)]))


def cutout_digests(em, segmentation, points, size):
    """(segment, node, sha1 of the cutout) from the plain reader, one group per point set."""
    reader = CutoutReader(em, segmentation, size)
    return [(p.segment_id, p.node_id, hashlib.sha1(c).hexdigest())
            for p, c in reader.cutouts(points)]


def run_make_cutouts(em, segmentation, points, **options):
    pipeline = beam.Pipeline(runner="FnApiRunner")
    digests = (pipeline
               | beam.Create(points, reshuffle=False)
               | MakeCutouts(em, segmentation, **options)
               | beam.MapTuple(lambda p, c: (p.segment_id, p.node_id, hashlib.sha1(c).hexdigest())))
    return pipeline, digests


def counters(result) -> dict[str, int]:
    return {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}


def test_pipeline_makes_one_cutout_per_point(dataset):
    em, segmentation, _, _, points = dataset
    pipeline, digests = run_make_cutouts(em, segmentation, points, block_size=64,
                                         cutout_size=33)
    assert_that(digests, equal_to(cutout_digests(em, segmentation, points, 33)))
    result = pipeline.run()
    result.wait_until_finish()
    found = counters(result)
    assert found["cutouts_emitted"] == len(points)
    assert found["cutouts_segment_absent"] == 0
    blocks = {block_of(p, 64) for p in points}
    assert found["blocks_read"] + found["windows_read"] >= len(blocks)
    assert found["bytes_decoded"] > 0


def test_dense_block_is_split_over_groups(dataset):
    em, segmentation, _, labels, _ = dataset
    points = random_points(labels, 60, seed=5)
    assert len({block_of(p, 256) for p in points}) == 1
    sizes = collections.Counter(group_key(p, 256, groups=4) for p in points)
    assert sorted(sizes) == [(0, 0, 0, g) for g in range(4)]
    pipeline, digests = run_make_cutouts(em, segmentation, points, block_size=256,
                                         max_points_per_group=16)
    assert_that(digests, equal_to(cutout_digests(em, segmentation, points, 129)))
    result = pipeline.run()
    result.wait_until_finish()
    found = counters(result)
    assert found["blocks_read"] == 4 and found["cutouts_emitted"] == 60


def test_group_key_spreads_a_dense_block_evenly():
    points = [Point(s, n, 300, 40, 7) for s in (2**64 - 1, 17) for n in range(5000)]
    sizes = collections.Counter(group_key(p, 256, groups=10) for p in points)
    assert {key[:3] for key in sizes} == {(1, 0, 0)} and len(sizes) == 10
    assert max(sizes.values()) < 1.1 * len(points) / 10


def test_pipeline_fails_on_point_outside_both_volumes(dataset):
    em, segmentation, _, _, points = dataset
    pipeline, _ = run_make_cutouts(em, segmentation, points[:3] + [Point(42, 9, 5, 5, 900)])
    with pytest.raises(Exception, match=r"segment 42, node 9\) at voxel \(5, 5, 900\)"):
        pipeline.run().wait_until_finish()


@pytest.mark.parametrize("options, message", [
    ({"cutout_size": 128}, "cutout_size: must be a positive odd"),
    ({"block_size": 0}, "block_size: must be a positive integer"),
    ({"max_points_per_group": 2.5}, "max_points_per_group: must be a positive integer"),
])
def test_make_cutouts_rejects_bad_options(dataset, options, message):
    em, segmentation, *_ = dataset
    with pytest.raises(ValueError, match=message):
        MakeCutouts(em, segmentation, **options)


def test_progress_lines_name_the_stage_total(caplog, monkeypatch):
    from segclr_beam import cutouts

    clock = iter([0.0, 5.0, 12.0, 13.0])
    monkeypatch.setattr(cutouts.time, "monotonic", lambda: next(clock))
    progress = cutouts.Progress("cutouts", every=10.0)
    with caplog.at_level("INFO", logger="segclr_beam.cutouts"):
        for done in (10, 130, 140):
            progress.update(done, 265)
    assert [r.getMessage() for r in caplog.records] == [
        f"cutouts: 130 made by worker {os.getpid()}, of 265 points in all"]
