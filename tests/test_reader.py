"""Reader on a release-style tree without info.json, and the `segclr-beam read` command."""

from __future__ import annotations

import numpy as np
import pytest

from segclr_beam import cli
from segclr_beam.outputs import CoordinateSystem, write_csv_zip
from segclr_beam.records import EmbeddingTable
from segclr_beam.shards import shard_of
from segclr_beam.reader import EmbeddingReader

NUM_SHARDS, BYTEWIDTH = 10000, 64
MICRONS = CoordinateSystem.microns_public((4.0, 4.0, 40.0))


@pytest.fixture()
def release(tmp_path):
    """A tree laid out like the public MICrONS release: nm coordinates, no info.json."""
    rng = np.random.default_rng(0)
    segments = {864691135591041291: 3, 864691134928303015: 5, 42: 1}
    by_shard: dict[int, list] = {}
    for segment_id, n in segments.items():
        by_shard.setdefault(shard_of(segment_id, NUM_SHARDS, BYTEWIDTH), []).append(
            EmbeddingTable(np.full(n, segment_id, np.uint64), np.arange(n),
                           rng.integers(0, 10 ** 5, (n, 3)),
                           rng.standard_normal((n, 64)).astype(np.float32)))
    for shard, tables in by_shard.items():
        table = EmbeddingTable(*(np.concatenate(c) for c in zip(
            *((t.segment_ids, t.node_ids, t.xyz, t.embeddings) for t in tables))))
        write_csv_zip(str(tmp_path / f"{shard}.zip"), table.sorted(), MICRONS)
    return tmp_path, segments


def test_reads_a_tree_without_info(release):
    path, segments = release
    reader = EmbeddingReader(str(path), num_shards=NUM_SHARDS, bytewidth=BYTEWIDTH)
    assert reader.info is None and reader.coordinates is None
    segment = reader.read_segment(864691134928303015)
    assert segment.node_ids.tolist() == list(range(5))
    assert segment.embeddings.shape == (5, 64) and segment.embeddings.dtype == np.float32
    assert (segment.xyz >= 110592).all()  # nm in the public MICrONS frame, as written
    assert {s.segment_id: len(s) for s in reader} == segments


def test_reads_chosen_segments_and_skips_absent_ones(release):
    path, segments = release
    reader = EmbeddingReader(str(path), num_shards=NUM_SHARDS, bytewidth=BYTEWIDTH)
    found = {s.segment_id: s for s in reader.read_segments([42, 7, 864691135591041291, 42])}
    assert {k: len(v) for k, v in found.items()} == {42: 1, 864691135591041291: 3}
    np.testing.assert_array_equal(found[42].embeddings, reader.read_segment(42).embeddings)


def test_cli_read_prints_a_summary(release, capsys):
    path, _ = release
    cli.main(["read", str(path), "--segment", "864691135591041291", "--num-shards",
              str(NUM_SHARDS), "--bytewidth", str(BYTEWIDTH)])
    text = capsys.readouterr().out
    assert f"shard 885 of {NUM_SHARDS} (bytewidth {BYTEWIDTH})" in text
    assert "3 nodes (ids 0..2), embedding dim 64" in text


def test_cli_read_errors_are_one_line(release):
    path, _ = release
    with pytest.raises(SystemExit, match="segment 7 is not in"):
        cli.main(["read", str(path), "--segment", "7", "--num-shards", str(NUM_SHARDS),
                  "--bytewidth", str(BYTEWIDTH)])
    with pytest.raises(SystemExit, match="has no info.json"):
        cli.main(["read", str(path), "--segment", "7"])
