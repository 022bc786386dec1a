"""Pair tables for tests and benchmarks: nearby voxels of one segment, drawn from labels."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from segclr_beam.records import pair_example


def sample_pairs(labels: np.ndarray, count: int, max_offset: int, seed: int
                 ) -> list[tuple[np.ndarray, int]]:
    """`count` pairs (centres [2, 3] x, y, z; segment id) of foreground voxels of one segment
    at most `max_offset` voxels apart per axis; labels are indexed [x, y, z]."""
    rng = np.random.default_rng(seed)
    foreground = np.argwhere(labels != 0)
    pairs = []
    while len(pairs) < count:
        first = foreground[rng.integers(len(foreground))]
        second = np.clip(first + rng.integers(-max_offset, max_offset + 1, 3), 0,
                         np.array(labels.shape) - 1)
        segment = labels[tuple(first)]
        if labels[tuple(second)] == segment:
            pairs.append((np.stack([first, second]), int(segment)))
    return pairs


def write_pair_table(prefix: str, pairs: list[tuple[np.ndarray, int]], num_shards: int = 2,
                     resolution=(32.0, 32.0, 33.0)) -> str:
    """Write `pairs` as NAME.tfrecord-SSSSS-of-NNNNN files at local `prefix`; returns it."""
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    writers = [tf.io.TFRecordWriter(f"{prefix}-{s:05d}-of-{num_shards:05d}")
               for s in range(num_shards)]
    for i, (centers, segment) in enumerate(pairs):
        distance = int(np.linalg.norm((centers[1] - centers[0]) * np.asarray(resolution)))
        writers[i % num_shards].write(pair_example(centers, segment, distance, (0, 0),
                                                   "em", "segmentation"))
    for writer in writers:
        writer.close()
    return prefix
