"""The pair-table job on a small synthetic region: pairs on one segment, path lengths against
the skeleton graph, the published feature spec, caps, reruns, an earlier run's points, GCS."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import tensorflow as tf
import tensorstore as ts
from osteoid import Skeleton

from segclr_beam import pairs, pairs_job, points, views
from segclr_beam.config import ConfigError, PairsConfig
from segclr_beam.job import POINTS_FILE
from segclr_beam.lock import OutputLock
from segclr_beam.pairs import PairOptions, candidate_pairs, choose, skeleton_graph
from segclr_beam.precomputed import SkeletonSource
from segclr_beam.records import Point

BBOX = (0, 0, 0, 128, 128, 96)
RESOLUTION = np.array([32.0, 32.0, 33.0])
# The published training tables' features (keys and shapes), written out here on purpose.
SPEC = {
    "center-0": tf.io.FixedLenFeature([1, 3], tf.int64),
    "center-1": tf.io.FixedLenFeature([1, 3], tf.int64),
    "skeleton_id-0": tf.io.FixedLenFeature([1], tf.int64),
    "skeleton_id-1": tf.io.FixedLenFeature([1], tf.int64),
    "distance": tf.io.FixedLenFeature([1], tf.int64),
    "dist_to_border-0": tf.io.FixedLenFeature([1], tf.int64),
    "dist_to_border-1": tf.io.FixedLenFeature([1], tf.int64),
    "vol_name": tf.io.FixedLenFeature([1], tf.string),
    "label_volume_name": tf.io.FixedLenFeature([1], tf.string),
}


def _config(dataset, out, **overrides) -> PairsConfig:
    return PairsConfig(segmentation=dataset.segmentation, em=dataset.em, output=str(out),
                       bbox=BBOX, chunk_size=64, num_shards=4, **overrides)


def _records(directory) -> list[dict]:
    """Every record of a table, parsed one by one with the published spec."""
    files = sorted(glob.glob(f"{directory}/pairs.tfrecord-*-of-*"))
    return [{k: v.numpy() for k, v in tf.io.parse_single_example(r, SPEC).items()}
            for r in tf.data.TFRecordDataset(files)]


def _files(root: Path, pattern: str = "**/*") -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern))
            if p.is_file()}


@pytest.fixture(scope="module")
def labels(synthetic_dataset) -> np.ndarray:
    store = ts.open({"driver": "neuroglancer_precomputed",
                     "kvstore": f"file://{synthetic_dataset.segmentation}"}).result()
    return store.read().result()[..., 0]  # x, y, z


@pytest.fixture(scope="module")
def table(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "table"
    summary = pairs_job.run(_config(synthetic_dataset, out, write_skeletons=True))
    return out, summary


# Pairs of one skeleton ----------------------------------------------------------------------

def _tree() -> tuple[np.ndarray, np.ndarray]:
    """A path of 40 vertices 250 nm apart with a 12-vertex branch at vertex 10, and a
    separate 5-vertex piece."""
    main = np.c_[np.arange(40) * 250.0, np.zeros(40), np.zeros(40)]
    branch = np.c_[np.full(12, 2500.0), (1 + np.arange(12)) * 300.0, np.zeros(12)]
    piece = np.c_[np.arange(5) * 250.0, np.full(5, 50000.0), np.zeros(5)]
    vertices = np.r_[main, branch, piece]
    edges = [(k, k + 1) for k in range(39)] + [(10, 40)] + [(40 + k, 41 + k) for k in range(11)]
    edges += [(52 + k, 53 + k) for k in range(4)]
    return vertices, np.array(edges)


def test_candidates_are_the_node_pairs_whose_path_lies_in_the_range():
    vertices, edges = _tree()
    nodes = np.array([0, 4, 10, 13, 20, 39, 41, 45, 51, 52, 56])
    graph = skeleton_graph(vertices, edges)
    full = scipy.sparse.csgraph.floyd_warshall(graph, directed=False)[np.ix_(nodes, nodes)]
    i, j, d = candidate_pairs(graph, nodes, 1000.0, 4000.0)
    expected = [(a, b) for a in range(len(nodes)) for b in range(a + 1, len(nodes))
                if 1000.0 <= full[a, b] <= 4000.0]
    assert list(zip(i.tolist(), j.tolist())) == expected
    np.testing.assert_allclose(d, full[i, j])
    assert ((i >= 9) == (j >= 9)).all()  # no path between the two pieces
    assert (9, 10) in expected  # 52 and 56 are 1000 nm apart on their own piece


def test_caps_and_minimum():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    options = PairOptions(min_pairs=10, max_pairs=50)
    chosen, repeats = choose(200, options, rng())
    assert len(chosen) == 50 and len(set(chosen.tolist())) == 50 and not repeats.any()
    chosen, repeats = choose(4, options, rng())
    assert len(chosen) == 10 and set(chosen.tolist()) == {0, 1, 2, 3}
    copies = {}
    for c, r in zip(chosen.tolist(), repeats.tolist()):
        assert r == copies.get(c, -1) + 1  # copies of one pair are numbered 0, 1, 2, ...
        copies[c] = r
    assert choose(20, options, rng())[0].tolist() == list(range(20))
    assert len(choose(0, options, rng())[0]) == 0
    np.testing.assert_array_equal(choose(200, options, rng())[0], choose(200, options, rng())[0])
    assert choose(200, options, np.random.default_rng(4))[0].tolist() != \
        choose(200, options, rng())[0].tolist()


def test_segment_pairs_depend_on_seed_and_segment_only():
    vertices, edges = _tree()
    nodes = [Point(9, k, *map(int, np.rint(v / RESOLUTION))) for k, v in
             enumerate(vertices[::3])]
    def drawn(segment: int, seed: int) -> list[tuple]:
        points = [p._replace(segment_id=segment) for p in nodes]
        options = PairOptions(min_pairs=2, max_pairs=6, seed=seed)
        return [p[1:] for p in pairs.segment_pairs(segment, vertices, edges, points,
                                                   RESOLUTION, options)]
    assert drawn(9, 0) == drawn(9, 0) and len(drawn(9, 0)) == 6
    assert drawn(9, 1) != drawn(9, 0) and drawn(2**64 - 9, 0) != drawn(9, 0)


def test_options_are_checked():
    with pytest.raises(ValueError, match="min_distance_nm"):
        PairOptions(min_distance_nm=6000.0, max_distance_nm=5000.0)
    with pytest.raises(ValueError, match="min_pairs"):
        PairOptions(min_pairs=20, max_pairs=10)
    with pytest.raises(ConfigError, match="^max_pairs|^min_pairs"):
        PairsConfig(segmentation="s", output="o", max_pairs=0).validate()


def test_node_far_from_its_skeleton_is_refused():
    vertices, edges = _tree()
    far = [Point(7, 0, 0, 0, 0), Point(7, 1, 0, 40, 0)]  # 1280 nm off the path
    with pytest.raises(ValueError, match="segment 7: node 1 .* from its skeleton"):
        pairs.segment_pairs(7, vertices, edges, far, RESOLUTION, PairOptions())


# The job ----------------------------------------------------------------------------------

def test_every_pair_is_on_one_segment_inside_the_volume_at_its_path_length(table, labels):
    out, summary = table
    records = _records(out)
    assert len(records) == summary.info["pairs"] > 0
    source = views.read_pair_table(str(out))  # what training reads
    assert len(source) == len(records)
    options = PairOptions()
    skeletons = {}
    for record in records:
        segment = int(np.int64(record["skeleton_id-0"][0]).view(np.uint64))
        assert record["skeleton_id-1"][0] == record["skeleton_id-0"][0]
        centers = np.stack([record["center-0"][0], record["center-1"][0]])
        assert (centers >= 0).all() and (centers < labels.shape).all()
        assert [labels[tuple(c)] for c in centers] == [segment, segment]
        for view, c in enumerate(centers):
            border = min(np.minimum(c, np.array(labels.shape) - 1 - c) * RESOLUTION)
            assert abs(record[f"dist_to_border-{view}"][0] - border) <= 0.5
        if segment not in skeletons:
            data = (out / "skeletons" / str(segment)).read_bytes()
            skeleton = Skeleton.from_precomputed(data)
            n = len(skeleton.vertices)
            a, b = skeleton.edges.T
            length = np.linalg.norm(skeleton.vertices[a] - skeleton.vertices[b], axis=1)
            graph = scipy.sparse.csr_matrix((length, (a, b)), shape=(n, n))
            skeletons[segment] = (skeleton.vertices - 0.5 * RESOLUTION, graph)
        vertices, graph = skeletons[segment]
        at = [int(np.argmin(np.linalg.norm(vertices - c * RESOLUTION, axis=1))) for c in centers]
        path = scipy.sparse.csgraph.dijkstra(graph, directed=False, indices=at[0])[at[1]]
        assert abs(record["distance"][0] - path) <= 1.0
        assert options.min_distance_nm <= record["distance"][0] <= options.max_distance_nm
    counts = np.unique(source.segment_ids, return_counts=True)[1]
    assert counts.min() >= options.min_pairs and counts.max() <= options.max_pairs
    assert len(counts) == summary.counters["segments_paired"] == summary.info["segments"]


def test_info_describes_the_table(table, synthetic_dataset):
    out, summary = table
    info = json.loads((out / "info.json").read_text())
    assert info["format"] == "segclr-beam pairs"
    assert info["files"] == "pairs.tfrecord-SSSSS-of-00004"
    assert sorted(p.name for p in out.glob("pairs.tfrecord-*")) == [
        f"pairs.tfrecord-{s:05d}-of-00004" for s in range(4)]
    assert set(info["features"]) == set(SPEC)
    assert info["vol_name"] == synthetic_dataset.em
    assert info["label_volume_name"] == synthetic_dataset.segmentation
    assert info["config"]["min_distance_nm"] == 1000.0
    assert info["repeated_pairs"] == summary.counters["pairs_repeated"]
    assert not list(out.glob(".segclr-temp-*"))


def test_rerun_is_byte_identical(table, synthetic_dataset, tmp_path):
    out, _ = table
    again = tmp_path / "again"
    (again / ".segclr-temp-killed").mkdir(parents=True)  # what a killed run left
    (again / ".segclr-temp-killed" / "pairs.tfrecord-00000-of-00002").write_bytes(b"partial")
    (again / "pairs.tfrecord-00007-of-00008").write_bytes(b"stale")
    pairs_job.run(_config(synthetic_dataset, again, write_skeletons=True))
    assert _files(again) == _files(out)


def test_points_and_skeletons_of_an_earlier_run(table, synthetic_dataset, tmp_path):
    out, _ = table
    run = tmp_path / "run"
    shutil.copytree(out / "skeletons", run / "skeletons")
    source = SkeletonSource.open(str(run / "skeletons"))
    found = []
    for segment in source.segment_ids():
        skeleton = source.read(segment)
        skeleton.vertices = skeleton.vertices - 0.5 * RESOLUTION
        found += points.skeleton_points(segment, skeleton, RESOLUTION, 1500.0)
    (run / POINTS_FILE).write_bytes(points.encode_avro(found))
    pairs_job.run(_config(synthetic_dataset, tmp_path / "from_run", points_from=str(run)))
    assert _files(tmp_path / "from_run", "pairs.*") == _files(out, "pairs.*")


def test_refusals_before_work(table, synthetic_dataset, tmp_path):
    out, _ = table
    with pytest.raises(ConfigError, match="^output: .* holds a previous pair table"):
        pairs_job.prepare(_config(synthetic_dataset, out))
    held = OutputLock.acquire(str(tmp_path / "locked"))
    with pytest.raises(ConfigError, match=f"run {held.run_id} .* is writing to this output"):
        pairs_job.prepare(_config(synthetic_dataset, tmp_path / "locked"))
    held.release()
    with pytest.raises(ConfigError, match="^points_from: .*has no points.avro"):
        pairs_job.prepare(_config(synthetic_dataset, tmp_path / "o", points_from=str(tmp_path)))
    (tmp_path / POINTS_FILE).write_bytes(points.encode_avro([]))
    with pytest.raises(ConfigError, match="^points_from: .*write-skeletons"):
        pairs_job.prepare(_config(synthetic_dataset, tmp_path / "o", points_from=str(tmp_path)))
    with pytest.raises(ConfigError, match="^bbox: "):
        pairs_job.prepare(_config(synthetic_dataset, tmp_path / "o").updated(
            {"bbox": (0, 0, 0, 500, 128, 96)}))


def test_a_range_no_pair_fits_fails_and_leaves_nothing(synthetic_dataset, tmp_path):
    config = _config(synthetic_dataset, tmp_path / "none", min_distance_nm=1e6,
                     max_distance_nm=2e6).updated({"bbox": (0, 0, 0, 64, 64, 64)})
    with pytest.raises(Exception, match="no segment gave a pair"):
        pairs_job.run(config)
    assert not [p for p in (tmp_path / "none").rglob("*") if p.is_file()]


def test_table_and_volumes_on_gcs(table, synthetic_dataset, gcs):
    out, _ = table
    em = gcs.upload_dir(synthetic_dataset.em, "pairs/em")
    segmentation = gcs.upload_dir(synthetic_dataset.segmentation, "pairs/segmentation")
    remote = f"gs://{gcs.bucket}/pairs/table"
    config = _config(synthetic_dataset, remote).updated(
        {"em": em, "segmentation": segmentation, "vol_name": synthetic_dataset.em,
         "label_volume_name": synthetic_dataset.segmentation})
    pairs_job.run(config)
    remote_table = views.read_pair_table(remote)
    local_table = views.read_pair_table(str(out))
    np.testing.assert_array_equal(remote_table.centers, local_table.centers)
    np.testing.assert_array_equal(remote_table.distance_nm, local_table.distance_nm)
    assert remote_table.vol_name == synthetic_dataset.em


def test_dataflow_translation(synthetic_dataset, tmp_path):
    beam_args = ["--runner=DataflowRunner", "--dry_run=True", "--project=segclr-test",
                 "--region=us-central1", "--temp_location=gs://segclr-test/tmp"]
    summary = pairs_job.run(_config(synthetic_dataset, tmp_path / "out"), beam_args)
    assert summary.info is None and not summary.counters
    names = {t.unique_name for t in summary.result.job.proto_pipeline.components.transforms.values()}
    assert {"Skeletons", "Sample", "Pairs", "Write"} <= names
    assert not (tmp_path / "out" / "info.json").exists()


def test_pairs_command_names_the_missing_field():
    from segclr_beam import cli

    with pytest.raises(SystemExit, match="segclr-beam pairs: segmentation: required"):
        cli.main(["pairs", "--output", "o"])
