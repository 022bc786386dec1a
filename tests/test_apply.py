"""Classifiers trained on and applied to a tree the embedding job wrote from a small synthetic
volume: labels, `classify apply` (FnApiRunner, GCS emulator, Dataflow translation), reports."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from segclr_beam import apply, classify, labels, points, synth, volume
from segclr_beam.job import POINTS_FILE
from segclr_beam.lock import OutputLock
from segclr_beam.reader import EmbeddingReader

FAST = classify.ClassifierConfig(hidden=16, random_features=128, max_epochs=30, patience=8,
                                 batch_size=64)
SUM_TOLERANCE = 2e-6  # K float32 roundings of probabilities that sum to 1 in float64


@pytest.fixture(scope="module")
def run(small_run):
    """The embedding job's output root on a 128 x 128 x 96 box of the synthetic volume."""
    return Path(small_run)


@pytest.fixture(scope="module")
def segment_labels(synthetic_dataset):
    return labels.read_labels(str(Path(synthetic_dataset.root) / synth.CLASSES_FILE))


@pytest.fixture(scope="module")
def trained(run, segment_labels, tmp_path_factory):
    """A plain and an SNGP classifier of segment classes on the 10 um tree, saved."""
    saved = {}
    for sngp in (False, True):
        path = str(tmp_path_factory.mktemp("classifiers") / ("sngp" if sngp else "plain"))
        classify.train_on_tree(str(run / "agg10um"), segment_labels,
                               dataclasses.replace(FAST, sngp=sngp)).save(path)
        saved[sngp] = path
    return saved


@pytest.fixture(scope="module")
def applied(run, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("applied") / "sngp"
    apply.run(str(run / "agg10um"), trained[True], str(out))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_compartment_labels_read_the_volume_at_each_node(run, synthetic_dataset):
    """Each node gets the compartment under its voxel, read here with TensorStore."""
    found = labels.compartment_labels(
        volume.open_volume(synthetic_dataset.compartments, "compartments", synth.RESOLUTION),
        str(run / "raw"))
    codes = ts.open({"driver": "neuroglancer_precomputed",
                     "kvstore": f"file://{synthetic_dataset.compartments}/"}
                    ).result()[..., 0].read().result()
    expected = {}
    for segment in EmbeddingReader(str(run / "raw")):
        for node, (x, y, z) in zip(segment.node_ids.tolist(), segment.xyz.tolist()):
            if codes[x, y, z]:
                expected[(segment.segment_id, node)] = synth.COMPARTMENTS[codes[x, y, z] - 1]
    assert len(expected) > 50 and found.by_node == expected
    assert {"axon", "shaft", "glia"} <= set(expected.values())


def test_apply_writes_one_row_per_node_with_probabilities_summing_to_one(run, trained,
                                                                          applied):
    meta = classify.read_meta(trained[True])
    k = len(meta["classes"])
    info = json.loads((applied / "info.json").read_text())
    assert info["classes"] == meta["classes"] and info["variant"] == "agg10um"
    assert info["csv_zip"]["columns"] == ",".join(
        ["node_id,x,y,z"] + [f"p_{c}" for c in meta["classes"]] + ["uncertainty"])
    sample = points.read_points(str(run / POINTS_FILE))
    expected = sorted((p.segment_id, p.node_id, p.x, p.y, p.z) for p in sample)
    out = EmbeddingReader(str(applied))
    rows, columns = [], []
    for segment in out:
        rows += [(segment.segment_id, n, *xyz) for n, xyz in
                 zip(segment.node_ids.tolist(), segment.xyz.tolist())]
        columns.append(segment.embeddings)
    assert sorted(rows) == expected and info["nodes"] == len(expected)
    values = np.concatenate(columns).astype(np.float64)
    assert values.shape[1] == k + 1
    assert np.abs(values[:, :k].sum(axis=1) - 1).max() <= SUM_TOLERANCE
    assert ((values >= 0) & (values <= 1)).all()
    # The rows are the saved classifier applied to the tree's embeddings, shard by shard
    # in the same batches, so equal bit for bit.
    classifier = classify.load(trained[True])
    tree = EmbeddingReader(str(run / "agg10um"))
    written = {s.segment_id: s.embeddings for s in out}
    for path in tree.shard_paths():
        segments = list(tree.read_shard(path))
        p, u = classifier.predict(np.concatenate([s.embeddings for s in segments]),
                                  apply.DEFAULT_BATCH_SIZE)
        np.testing.assert_array_equal(np.concatenate([written[s.segment_id] for s in segments]),
                                      np.concatenate([p, u[:, None]], 1).astype(np.float32))


def test_segment_summary_is_the_majority_of_the_rows(applied):
    info = json.loads((applied / "info.json").read_text())
    classes = info["classes"]
    summary = apply.read_segment_summary(str(applied))
    segments = list(EmbeddingReader(str(applied)))
    assert sorted(summary) == sorted(s.segment_id for s in segments)
    for segment in segments:
        votes = np.bincount(segment.embeddings[:, :len(classes)].argmax(axis=1),
                            minlength=len(classes))
        nodes, name, fraction, uncertainty = summary[segment.segment_id]
        assert nodes == len(segment) and name == classes[int(votes.argmax())]
        assert fraction == pytest.approx(votes.max() / len(segment), rel=1e-6)
        assert uncertainty == pytest.approx(segment.embeddings[:, -1].mean(), rel=1e-5)


def test_rerun_is_byte_identical_and_refuses_to_overwrite(run, trained, applied, tmp_path):
    again = tmp_path / "again"
    apply.run(str(run / "agg10um"), trained[True], str(again))
    assert _files(again) == _files(applied)
    with pytest.raises(ValueError, match="holds a previous classification"):
        apply.run(str(run / "agg10um"), trained[True], str(again))
    apply.run(str(run / "agg10um"), trained[True], str(again), overwrite=True)
    assert _files(again) == _files(applied)


def test_one_run_per_output_and_a_failed_run_leaves_nothing(run, trained, tmp_path):
    held = OutputLock.acquire(str(tmp_path / "locked"))
    with pytest.raises(ValueError, match=f"run {held.run_id} .* is writing to this output"):
        apply.run(str(run / "agg10um"), trained[True], str(tmp_path / "locked"))
    held.release()
    broken = tmp_path / "broken"
    shutil.copytree(run / "agg10um", broken)
    last = sorted(broken.glob("*.zip"))[-1]
    last.write_bytes(last.read_bytes()[:100])  # a truncated shard file
    out = tmp_path / "out"
    with pytest.raises(Exception, match="zip file"):
        apply.run(str(broken), trained[True], str(out))
    assert not out.exists() or not any(out.iterdir())


def test_annotation_layer_carries_class_and_uncertainty(run, trained, applied, tmp_path):
    """The layer's nodes are the tree's, with the written class probabilities; the annotation
    writer itself is tested in tests/test_annotations.py."""
    out = tmp_path / "layer"
    apply.run(str(run / "agg10um"), trained[True], str(out), annotations=True)
    layer = json.loads((out / "annotations" / "info").read_text())
    classes = classify.read_meta(trained[True])["classes"]
    properties = {p["id"]: p for p in layer["properties"]}
    assert properties["class"]["enum_labels"] == classes
    assert {"uncertainty", *(f"p_{c}" for c in classes)} <= set(properties)
    info = json.loads((out / "info.json").read_text())
    assert layer["segclr"]["nodes"] == info["nodes"] and info["annotations"] == "annotations"
    written = _files(out)
    for name, data in _files(applied).items():  # the rest is what apply writes without it
        assert name == "info.json" or written[name] == data, name


def test_refuses_another_variant_or_embedding_model(run, trained, tmp_path):
    with pytest.raises(ValueError, match=r"variant: the tree .*/raw has 'raw', the classifier "
                                         r".* was trained on 'agg10um'"):
        apply.run(str(run / "raw"), trained[False], str(tmp_path / "raw"))
    other = tmp_path / "other-model"
    shutil.copytree(trained[False], other)
    meta = json.loads((other / classify.META_NAME).read_text())
    meta["input"]["model"].update(model_id="segclr-elsewhere", weights_sha256="0" * 64)
    (other / classify.META_NAME).write_text(json.dumps(meta))
    tree_model = json.loads((run / "agg10um" / "info.json").read_text())["model"]["model_id"]
    with pytest.raises(ValueError, match=rf"embedding model: the tree .* was embedded by "
                                         rf"'{tree_model}' .* embeddings of 'segclr-elsewhere'"):
        apply.run(str(run / "agg10um"), str(other), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "raw").exists()


def test_apply_on_gcs(run, trained, applied, gcs):
    from apache_beam.io.filesystems import FileSystems

    tree = gcs.upload_dir(run / "agg10um", "classify/agg10um")
    classifier = gcs.upload_dir(trained[True], "classify/sngp")
    remote = f"gs://{gcs.bucket}/classify/out"
    apply.run(tree, classifier, remote)
    for name, data in _files(applied).items():
        if name == "info.json":
            continue  # names the tree and classifier paths
        with FileSystems.open(f"{remote}/{name}") as f:
            assert f.read() == data, name


def test_dataflow_translation(run, trained, tmp_path):
    beam_args = ["--runner=DataflowRunner", "--dry_run=True", "--project=segclr-test",
                 "--region=us-central1", "--temp_location=gs://segclr-test/tmp"]
    result = apply.run(str(run / "agg10um"), trained[False], str(tmp_path / "out"), beam_args)
    names = {t.unique_name for t in result.job.proto_pipeline.components.transforms.values()}
    assert set(apply.STAGES) <= names
    assert not (tmp_path / "out" / "info.json").exists()


def test_commands_train_apply_and_report_with_pictures(run, tmp_path, synthetic_dataset,
                                                       capsys):
    from segclr_beam import cli

    small = ["--hidden", "16", "--random-features", "128", "--max-epochs", "8",
             "--patience", "4"]
    labels_path = str(Path(synthetic_dataset.root) / synth.CLASSES_FILE)
    cli.main(["classify", "train", "--tree", str(run / "agg25um"), "--labels", labels_path,
              "--out", str(tmp_path / "c"), "--blocks", "0", *small])
    assert json.loads(capsys.readouterr().out)["classes"] == sorted(
        set(synthetic_dataset.classes.values()))
    cli.main(["classify", "apply", "--tree", str(run / "agg25um"), "--classifier",
              str(tmp_path / "c"), "--output", str(tmp_path / "o"), "--batch-size", "7"])
    assert capsys.readouterr().out.startswith("classified ")
    assert (tmp_path / "o" / "info.json").exists()
    cli.main(["classify", "report", "--train", str(run),
              "--compartments", synthetic_dataset.compartments,
              "--compartments-resolution", "32,32,33", "--variants", "agg10um",
              "--holdout-classes", "glia", "--pictures", str(tmp_path / "pictures"), *small])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["task", "head"] and "agg10um" in table[0]
    assert [line.split()[:2] for line in table[1:3]] == [["compartment", "plain"],
                                                         ["compartment", "sngp"]]
    values = [float(v) for line in table[1:3] for v in line.split()[2:]]
    assert len(values) == 6 and all(0 <= v <= 1 for v in values)
    assert [line.split()[:4] for line in table[3:5]] == [
        ["compartment", head, "agg10um", "glia"] for head in ("plain", "sngp")]
    for name in ("umap.png", "confusion.png"):
        assert (tmp_path / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="classify apply: .*variant"):
        cli.main(["classify", "apply", "--tree", str(run / "raw"), "--classifier",
                  str(tmp_path / "c"), "--output", str(tmp_path / "p")])
