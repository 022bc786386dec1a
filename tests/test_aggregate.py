"""Radius means against a brute-force O(N^2) computation, and the Beam transform around them."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from segclr_beam.aggregate import AggregateEmbeddings, radius_means
from segclr_beam.records import Point

RESOLUTION = np.array([32.0, 32.0, 40.0])


def brute_force(positions: np.ndarray, embeddings: np.ndarray, radius: float) -> np.ndarray:
    d2 = ((positions[:, None, :] - positions[None, :, :]) ** 2).sum(-1)
    within = (d2 <= radius * radius).astype(np.float64)
    return ((within @ embeddings.astype(np.float64)) / within.sum(1)[:, None]).astype(np.float32)


def random_segments(rng: np.random.Generator, sizes=(1200, 500, 250, 49, 1), dim=16):
    """Segments of clustered nodes on the voxel lattice, so many pairs sit exactly at R."""
    segments = {}
    for k, n in enumerate(sizes):
        centres = rng.integers(0, 2000, (max(1, n // 100), 3))
        voxels = centres[rng.integers(0, len(centres), n)] + rng.integers(-300, 300, (n, 3))
        voxels = np.unique(voxels, axis=0)  # one node per position, as the writers require
        segments[1000 + k] = (voxels, rng.standard_normal((len(voxels), dim)).astype(np.float32))
    return segments


@pytest.mark.parametrize("max_pairs", [1 << 21, 64])
def test_radius_means_equal_brute_force(max_pairs):
    rng = np.random.default_rng(0)
    total = 0
    for voxels, embeddings in random_segments(rng).values():
        positions = voxels * RESOLUTION
        means = radius_means(positions, embeddings, [10000.0, 2500.0], max_pairs=max_pairs)
        assert list(means) == [10000.0, 2500.0]
        for radius, got in means.items():
            assert got.dtype == np.float32 and got.shape == embeddings.shape
            np.testing.assert_array_max_ulp(got, brute_force(positions, embeddings, radius),
                                            maxulp=1)
        total += len(voxels)
    assert total > 1900


def test_radius_is_inclusive():
    positions = np.array([[0.0, 0.0, 0.0], [10000.0, 0.0, 0.0], [0.0, 10000.5, 0.0],
                          [6000.0, 8000.0, 0.0]])
    embeddings = np.array([[1.0], [2.0], [4.0], [8.0]], np.float32)
    means = radius_means(positions, embeddings, [10000.0])[10000.0]
    # Node 0 sees nodes 1 and 3 at exactly 10 um; node 2 is 0.5 nm too far.
    assert means[0, 0] == pytest.approx((1 + 2 + 8) / 3)
    assert means[2, 0] == pytest.approx((4 + 8) / 2)  # |(0,10000.5)-(6000,8000)| < 10 um


def test_empty_and_single_node():
    assert radius_means(np.zeros((0, 3)), np.zeros((0, 4), np.float32), [1.0])[1.0].shape == (0, 4)
    one = radius_means(np.zeros((1, 3)), np.full((1, 2), 3.0, np.float32), [5.0])[5.0]
    np.testing.assert_array_equal(one, [[3.0, 3.0]])


@pytest.mark.parametrize("positions, embeddings, radii, message", [
    (np.zeros((3, 2)), np.zeros((3, 4)), [1.0], r"positions_nm must have shape \[N, 3\]"),
    (np.zeros((3, 3)), np.zeros((2, 4)), [1.0], r"embeddings must have shape \[3, D\]"),
    (np.full((1, 3), np.nan), np.zeros((1, 4)), [1.0], "NaN or infinite"),
    (np.zeros((1, 3)), np.zeros((1, 4)), [0.0], "radius must be > 0"),
])
def test_bad_inputs(positions, embeddings, radii, message):
    with pytest.raises(ValueError, match=message):
        radius_means(positions, embeddings, radii)


def test_bad_transform_options():
    with pytest.raises(ValueError, match="resolution_nm"):
        AggregateEmbeddings((32.0, 32.0))
    with pytest.raises(ValueError, match="duplicates"):
        AggregateEmbeddings(RESOLUTION, (10000, 10000.0))


def test_transform_matches_plain_function():
    segments = random_segments(np.random.default_rng(1), sizes=(300, 120, 7), dim=8)
    records = [(Point(segment_id, node_id, *map(int, xyz)), embedding)
               for segment_id, (voxels, embeddings) in segments.items()
               for node_id, (xyz, embedding) in enumerate(zip(voxels, embeddings))]
    radii = (10000.0, 25000.0)
    expected = {}
    for segment_id, (voxels, embeddings) in segments.items():
        for radius, means in radius_means(voxels * RESOLUTION, embeddings, radii).items():
            for node_id, row in enumerate(means):
                expected[radius, segment_id, node_id] = row

    def check(radius):
        def matcher(actual):
            assert len(actual) == len(records)
            for point, row in actual:
                assert row.dtype == np.float32
                np.testing.assert_array_equal(row, expected[radius, point.segment_id,
                                                            point.node_id])
            assert {tuple(p) for p, _ in actual} == {tuple(p) for p, _ in records}
        return matcher

    with beam.Pipeline(runner="FnApiRunner") as p:
        aggregated = (p | beam.Create(records, reshuffle=False)
                      | AggregateEmbeddings(RESOLUTION, radii))
        assert sorted(aggregated) == ["agg10um", "agg25um"]
        assert_that(aggregated["agg10um"], check(10000.0), label="Check10")
        assert_that(aggregated["agg25um"], check(25000.0), label="Check25")
