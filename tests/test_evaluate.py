"""Evaluation of embeddings by labelled class: folds by segment, scores against a brute-force
k-NN, class signal found, segment identity not taken for class, the mask baseline, files."""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pytest
import tensorstore as ts

from segclr_beam import cli, evaluate
from segclr_beam.evaluate import EvaluationError, segment_folds
from segclr_beam.outputs import CoordinateSystem, WriteEmbeddings
from segclr_beam.records import Point

RESOLUTION = (32.0, 32.0, 33.0)
CUTOUT = 33
NODES = 8  # per segment
DIM = 6


@pytest.fixture(scope="module")
def labels_array(synthetic_dataset) -> np.ndarray:
    store = ts.open({"driver": "neuroglancer_precomputed",
                     "kvstore": f"file://{synthetic_dataset.segmentation}"}).result()
    return store.read().result()[..., 0]  # x, y, z


@pytest.fixture(scope="module")
def nodes(synthetic_dataset, labels_array) -> list[Point]:
    """NODES random voxels of every labelled segment of at least 200 voxels."""
    rng = np.random.default_rng(0)
    flat = labels_array.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    found = []
    for segment, start, count in zip(ids.tolist(), starts, counts):
        if segment not in synthetic_dataset.classes or count < 200:
            continue
        chosen = np.sort(order[start + rng.choice(count, NODES, replace=False)])
        voxels = np.stack(np.unravel_index(chosen, labels_array.shape), axis=1)
        found += [Point(segment, k, *map(int, v)) for k, v in enumerate(voxels)]
    return found


def _write_run(root, records: list[tuple[Point, np.ndarray]]) -> str:
    """An output root with raw/ and agg10um/ trees of `records` (agg10um holds the same
    vectors: the trees' contents are the test's choice)."""
    with beam.Pipeline() as pipeline:
        made = pipeline | beam.Create(records, reshuffle=False)
        _ = {"raw": made, "agg10um": made} | WriteEmbeddings(
            str(root), {"raw": None, "agg10um": 10000.0},
            coordinates=CoordinateSystem.voxels(RESOLUTION), num_shards=8, bytewidth=8,
            embedding_dim=DIM, formats=("csv_zip",))
    return str(root)


def _class_vectors(classes) -> dict[str, np.ndarray]:
    return {c: 6.0 * np.eye(DIM)[i] for i, c in enumerate(sorted(set(classes.values())))}


@pytest.fixture(scope="module")
def class_run(synthetic_dataset, nodes, tmp_path_factory) -> str:
    """Embeddings that carry the class: a vector per class plus noise."""
    rng = np.random.default_rng(1)
    vectors = _class_vectors(synthetic_dataset.classes)
    records = [(p, (vectors[synthetic_dataset.classes[p.segment_id]]
                    + rng.normal(0, 0.5, DIM)).astype(np.float32)) for p in nodes]
    return _write_run(tmp_path_factory.mktemp("evaluate") / "class", records)


def test_folds_keep_every_segment_in_one_test_fold():
    rng = np.random.default_rng(2)
    segments = rng.integers(1, 40, 500).astype(np.uint64)
    classes = np.array(["a", "b", "c"])[segments.astype(np.int64) % 3]
    folds = segment_folds(classes, segments, 5, seed=3)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(500))  # every node held out exactly once
    for train, test in folds:
        assert not set(segments[train].tolist()) & set(segments[test].tolist())
        assert len(train) + len(test) == 500
    assert [t.tolist() for _, t in segment_folds(classes, segments, 5, seed=3)] == \
        [t.tolist() for _, t in folds]
    with pytest.raises(EvaluationError, match="^folds: "):
        segment_folds(classes, segments, 100)


def _reference_knn(features, classes, folds, k) -> float:
    """Balanced accuracy of out-of-fold k-NN by brute force: features standardised on the
    training nodes, Euclidean distance, majority vote, ties to the first class in order."""
    names = sorted(set(classes.tolist()))
    index = np.array([names.index(c) for c in classes])
    predicted = np.empty(len(classes), np.int64)
    for train, test in folds:
        mean, std = features[train].mean(0), features[train].std(0)
        std[std == 0] = 1.0
        a, b = (features[train] - mean) / std, (features[test] - mean) / std
        distance = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
        for row, found in zip(test, nearest):
            predicted[row] = np.bincount(index[train][found], minlength=len(names)).argmax()
    return float(np.mean([np.mean(predicted[index == c] == c) for c in range(len(names))]))


def test_knn_scores_match_a_brute_force_reference():
    rng = np.random.default_rng(4)
    segments = np.repeat(np.arange(1, 31), 6).astype(np.uint64)
    classes = np.array(["x", "y", "z"])[(segments.astype(np.int64) % 3)]
    features = rng.normal(size=(len(segments), 4)) + 0.8 * (segments.astype(np.int64) % 3)[:, None]
    folds = segment_folds(classes, segments, 4, seed=0)
    scores = evaluate.score(features, classes, folds, k=5)
    assert scores["knn"]["balanced_accuracy"] == pytest.approx(
        _reference_knn(features, classes, folds, 5), abs=1e-12)
    assert scores["knn"]["balanced_accuracy"] == pytest.approx(
        np.mean(list(scores["knn"]["recall"].values())))


def test_class_signal_is_found_in_every_variant(class_run, synthetic_dataset):
    result = evaluate.evaluate(class_run, synthetic_dataset.classes, k=5, folds=3)
    assert list(result["variants"]) == ["raw", "agg10um"]
    assert result["left_out_classes"] == {"soma": 1}  # one soma: no fold trains and tests it
    for scores in result["variants"].values():
        assert scores["knn"]["balanced_accuracy"] > 0.9
        assert scores["linear"]["balanced_accuracy"] > 0.9
        assert set(scores["knn"]["recall"]) == {"axon", "dendrite", "glia"}
    assert sum(c["nodes"] for c in result["classes"].values()) == result["variants"]["raw"]["nodes"]
    json.dumps(result)
    table = evaluate.format_table(result)
    assert "agg10um" in table and "balanced acc." in table


def test_segment_identity_is_not_taken_for_class(synthetic_dataset, nodes, tmp_path):
    """Embeddings that name the segment and nothing of its class: node-level folds would
    score them near 1 (neighbours are nodes of the same segment); folds by segment do not."""
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(5)
    identity = {s: rng.normal(size=DIM) * 3 for s in {p.segment_id for p in nodes}}
    records = [(p, (identity[p.segment_id] + rng.normal(0, 0.1, DIM)).astype(np.float32))
               for p in nodes]
    root = _write_run(tmp_path / "identity", records)
    result = evaluate.evaluate(root, synthetic_dataset.classes, k=5, folds=3)
    grouped = result["variants"]["raw"]["knn"]["balanced_accuracy"]
    features = np.array([e for _, e in records])
    classes = np.array([synthetic_dataset.classes[p.segment_id] for p, _ in records])
    leaky = list(StratifiedKFold(3, shuffle=True, random_state=0).split(features, classes))
    assert evaluate.score(features, classes, leaky)["knn"]["balanced_accuracy"] > 0.9
    assert grouped < 0.7


def test_mask_baseline_features_and_variants(class_run, synthetic_dataset, labels_array, nodes):
    result = evaluate.evaluate(class_run, synthetic_dataset.classes, k=5, folds=3,
                               baseline=True, segmentation=synthetic_dataset.segmentation,
                               cutout_size=CUTOUT)
    assert list(result["variants"]) == ["raw", "agg10um", "mask/raw", "mask/agg10um"]
    for name in ("mask/raw", "mask/agg10um"):
        assert 0.0 <= result["variants"][name]["knn"]["balanced_accuracy"] <= 1.0
    from segclr_beam.volume import open_volume

    volume = open_volume(synthetic_dataset.segmentation, "segmentation", RESOLUTION)
    sample = nodes[::17]
    features = evaluate.mask_features(volume, np.array([p.segment_id for p in sample], np.uint64),
                                      np.array([p[2:] for p in sample]), CUTOUT)
    padded = np.pad(labels_array, CUTOUT // 2)
    for p, row in zip(sample, features):
        window = padded[p.x:p.x + CUTOUT, p.y:p.y + CUTOUT, p.z:p.z + CUTOUT] == p.segment_id
        assert row[0] == pytest.approx(window.mean())
        for axis in range(3):
            present = np.flatnonzero(window.any(axis=tuple(a for a in range(3) if a != axis)))
            assert row[1 + axis] == pytest.approx(
                (present.max() - present.min() + 1) * RESOLUTION[axis])
        assert row[4] >= row[5] >= row[6] >= 0


def test_labels_files_and_their_errors(synthetic_dataset, tmp_path):
    from pathlib import Path

    classes = str(Path(synthetic_dataset.root) / "classes.json")
    assert evaluate.load_labels(classes) == synthetic_dataset.classes
    (tmp_path / "l.csv").write_text("segment_id,class\n5,axon\n18446744073709551615,glia\n")
    assert evaluate.load_labels(str(tmp_path / "l.csv")) == {5: "axon", 2**64 - 1: "glia"}
    (tmp_path / "bad.csv").write_text("segment_id,class\n5,axon\nfive,glia\n")
    with pytest.raises(EvaluationError, match=r"bad.csv:3: segment id must be an integer"):
        evaluate.load_labels(str(tmp_path / "bad.csv"))
    (tmp_path / "cols.csv").write_text("id,label\n5,axon\n")
    with pytest.raises(EvaluationError, match=r"cols.csv:1: need columns segment_id and class"):
        evaluate.load_labels(str(tmp_path / "cols.csv"))
    (tmp_path / "l.json").write_text('{"7": ""}')
    with pytest.raises(EvaluationError, match=r"l.json: segment '7': class must be"):
        evaluate.load_labels(str(tmp_path / "l.json"))


def test_runs_without_labels_or_trees_are_refused(class_run, tmp_path):
    with pytest.raises(EvaluationError, match="none of its .* segments has a label"):
        evaluate.evaluate(class_run, {1: "axon"})
    with pytest.raises(EvaluationError, match="no embedding tree"):
        evaluate.evaluate(str(tmp_path), {1: "axon"})


def test_command_prints_the_table_and_writes_json(class_run, synthetic_dataset, tmp_path,
                                                  capsys):
    from pathlib import Path

    out = tmp_path / "scores.json"
    cli.main(["evaluate", class_run, "--labels", str(Path(synthetic_dataset.root) / "classes.json"),
              "--json", str(out), "--k", "3", "--folds", "3"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["k"] == 3 and result["folds"] == 3
    assert f"{result['variants']['raw']['knn']['balanced_accuracy']:.3f}" in printed


def test_tree_on_gcs(class_run, synthetic_dataset, gcs):
    remote = gcs.upload_dir(class_run, "evaluate/run")
    local = evaluate.evaluate(class_run, synthetic_dataset.classes, folds=3)
    assert evaluate.evaluate(remote, synthetic_dataset.classes, folds=3)["variants"] == \
        local["variants"]
