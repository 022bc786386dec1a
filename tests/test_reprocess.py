"""Reprocessing a new segmentation version equals a full run on it, doing only the changed work."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from apache_beam.io.filesystems import FileSystems

from segclr_beam import manifest, pipeline, reprocess, synth
from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.reader import EmbeddingReader
from segclr_beam.volume import open_volume
from tolerance import assert_embeddings_close

SHAPE = (96, 96, 64)
VARIANTS = ("raw", "agg10um", "agg25um")


@dataclasses.dataclass
class Edits:
    """Version 2 of the synthetic segmentation and the fate of each version-1 segment."""

    segmentation: str
    unchanged: list[int]
    relabelled: dict[int, int]  # version-1 id -> version-2 id
    changed: list[int]
    new: list[int]
    removed: list[int]


def _touching(labels: np.ndarray, a: int, b: int) -> bool:
    mask = labels == a
    other = labels == b
    return any((np.roll(mask, shift, axis) & other).any() for axis in range(3) for shift in (1, -1))


def _version2(labels: np.ndarray, classes: dict[int, str], v1_dir: Path, out: Path) -> Edits:
    """Merge two touching neurites, split one, take voxels from one, add voxels to one, relabel
    one and remove one; write the result as a copy of the version-1 segmentation volume."""
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    size = dict(zip(ids.tolist(), counts.tolist()))
    neurites = sorted((i for i in size if classes[i] != "glia"), key=lambda i: (size[i], i))
    keep, gone = next((a, b) for k, a in enumerate(neurites) for b in neurites[k + 1:]
                      if _touching(labels, a, b))
    rest = [i for i in neurites if i not in (keep, gone)]
    split, shrunk, grown, relabelled, removed = rest[-1], rest[-2], rest[-3], rest[0], rest[1]
    piece, new_label = 1001, 1002

    v2 = labels.copy()
    v2[labels == gone] = keep
    xs = np.nonzero(labels == split)[0]
    v2[(labels == split) & (np.arange(labels.shape[0])[:, None, None] < np.median(xs))] = piece
    at = np.argwhere(labels == shrunk)[size[shrunk] // 2]  # a ball of voxels taken away
    ball = tuple(slice(max(0, v - 3), v + 3) for v in at)
    v2[ball][v2[ball] == shrunk] = 0
    border = (labels == 0) & np.logical_or.reduce(  # background voxels next to `grown`
        [np.roll(labels == grown, s, a) for a in range(3) for s in (1, -1)])
    near = np.zeros(labels.shape, bool)  # those in one small box join it
    near[tuple(slice(max(0, v - 4), v + 4) for v in np.argwhere(border)[0])] = True
    v2[border & near] = grown
    v2[labels == relabelled] = new_label
    v2[labels == removed] = 0

    shutil.copytree(v1_dir, out)
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}/"},
                    write=True).result()
    store[..., 0].write(v2).result()
    touched = {keep, gone, split, shrunk, grown, relabelled, removed}
    return Edits(str(out), sorted(set(size) - touched), {relabelled: new_label},
                 sorted([keep, split, shrunk, grown]), [piece], sorted([gone, removed]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_model):
    """Version 1 run in full, version 2 in full, and version 2 reprocessed from version 1."""
    root = tmp_path_factory.mktemp("reprocess")
    dataset = synth.write_dataset(root / "v1", shape=SHAPE, seed=0)
    segmentation = open_volume(dataset.segmentation, "segmentation", synth.RESOLUTION)
    edits = _version2(segmentation.read(segmentation.bounds), dataset.classes,
                      Path(dataset.segmentation), root / "v2")

    def config(segmentation: str, output: str) -> EmbedConfig:
        return EmbedConfig(em=dataset.em, segmentation=segmentation, model=small_model,
                           output=output, resolution=synth.RESOLUTION, chunk_size=64,
                           cutout_size=33, batch_size=8, num_shards=8, formats=("csv_zip",))

    full1 = str(root / "full1")
    pipeline.run(config(dataset.segmentation, full1))
    before = _digests(full1)
    full2 = str(root / "full2")
    full_summary = pipeline.run(config(edits.segmentation, full2))
    reprocessed = str(root / "reprocessed")
    summary = reprocess.reprocess(full1, {"segmentation": edits.segmentation,
                                          "output": reprocessed})
    return dict(root=root, edits=edits, full1=full1, full2=full2, reprocessed=reprocessed,
                summary=summary, full_summary=full_summary, before=before, config=config)


def _digests(root: str) -> dict[str, str]:
    """sha256 of every file under `root`, run.json aside (it records the run)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != "run.json"}


def _without_embeddings(digests: dict[str, str]) -> dict[str, str]:
    """The files that hold no embedding values (points, segment fingerprints, info files);
    the annotation layer holds embeddings and colours fitted on them."""
    return {name: digest for name, digest in digests.items()
            if not name.endswith((".zip", ".tfrecord")) and not name.startswith(
                (f"{manifest.MANIFEST_DIR}/{manifest.NODES}/",
                 f"{manifest.MANIFEST_DIR}/{manifest.MANIFEST_FILE}", "annotations/"))}


def _segments(tree: str) -> dict[int, object]:
    return {s.segment_id: s for s in EmbeddingReader(tree)}


def _nodes(root: str) -> dict[tuple[int, int], manifest.NodeRecord]:
    return {(r.point.segment_id, r.point.node_id): r
            for r in manifest.Manifest.open(root).read(manifest.NODES)}


def _check_contract(root: str, runs: dict, carried: dict[int, int]) -> int:
    """The equality contract of reprocessing against a full run on the new version (README).

    Segments, nodes, points, cutout digests and every file without embeddings: equal. Raw
    embeddings of carried segments (`carried`: new id -> previous id) and of nodes whose
    cutout a previous, stale node had: the previous run's, bit for bit. Re-embedded nodes:
    within BATCH_TOLERANCE of the full run's (the model saw them in other batches). Radius
    means: the previous run's, bit for bit, for carried segments; within BATCH_TOLERANCE of
    the full run's otherwise. Returns the number of nodes the model re-embedded.
    """
    previous, full, found = (_nodes(r) for r in (runs["full1"], runs["full2"], root))
    assert sorted(found) == sorted(full)
    stale: dict[bytes, set[bytes]] = {}
    for (segment_id, _), record in previous.items():
        if segment_id not in carried.values():
            stale.setdefault(record.cutout_digest, set()).add(record.embedding.tobytes())
    reembedded = 0
    for (segment_id, node_id), record in found.items():
        expected = full[segment_id, node_id]
        assert (record.point, record.cutout_digest) == (expected.point, expected.cutout_digest)
        if segment_id in carried:
            old = previous[carried[segment_id], node_id].embedding
            assert record.embedding.tobytes() == old.tobytes(), (segment_id, node_id)
        elif record.cutout_digest in stale:
            assert record.embedding.tobytes() in stale[record.cutout_digest], (segment_id, node_id)
        else:
            reembedded += 1
        assert_embeddings_close(record.embedding, expected.embedding,
                                f"node {segment_id}:{node_id}")

    for variant in VARIANTS:
        tree, reference = _segments(f"{root}/{variant}"), _segments(f"{runs['full2']}/{variant}")
        before = _segments(f"{runs['full1']}/{variant}")
        assert sorted(tree) == sorted(reference), variant
        for segment_id, segment in tree.items():
            expected = reference[segment_id]
            np.testing.assert_array_equal(segment.node_ids, expected.node_ids)
            np.testing.assert_array_equal(segment.xyz, expected.xyz)
            if variant == "raw":  # the tree holds the manifest's embeddings, bit for bit
                np.testing.assert_array_equal(segment.embeddings.view(np.uint32), np.stack(
                    [found[segment_id, n].embedding for n in segment.node_ids]).view(np.uint32))
            elif segment_id in carried:
                previous_means = before[carried[segment_id]].embeddings
                np.testing.assert_array_equal(segment.embeddings.view(np.uint32),
                                              previous_means.view(np.uint32))
            assert_embeddings_close(segment.embeddings, expected.embeddings,
                                    f"{variant} segment {segment_id}")
    assert _without_embeddings(_digests(root)) == _without_embeddings(_digests(runs["full2"]))
    records = [json.loads(Path(r, "run.json").read_text()) for r in (root, runs["full2"])]
    for record in records:
        record["config"].pop("output")
        record.pop("summary")  # what each run made: reprocessing embeds less
    assert records[0] == records[1]
    return reembedded


def test_reprocess_equals_full_run(runs):
    edits = runs["edits"]
    carried = {i: i for i in edits.unchanged}
    carried.update({new: old for old, new in edits.relabelled.items()})
    reembedded = _check_contract(runs["reprocessed"], runs, carried)
    assert 0 < reembedded == runs["summary"].run.counters["embeddings"]
    assert _digests(runs["full1"]) == runs["before"], "the previous run was modified"


def test_classification_and_only_changed_work(runs):
    edits, summary = runs["edits"], runs["summary"]
    assert summary.changes == {"unchanged": len(edits.unchanged), "relabelled": 1,
                               "changed": len(edits.changed), "new": len(edits.new),
                               "removed": len(edits.removed)}
    nodes = {s.segment_id: len(s) for s in EmbeddingReader(f"{runs['full2']}/raw")}
    fresh = sum(nodes.get(i, 0) for i in edits.changed + edits.new)
    kept = sum(nodes.get(i, 0) for i in edits.unchanged + list(edits.relabelled.values()))
    counters = summary.run.counters
    assert counters["nodes_carried"] == kept > 0
    assert counters["embeddings"] == fresh - counters.get("embeddings_reused", 0)
    assert counters["embeddings"] < runs["full_summary"].counters["embeddings"]
    assert counters["cutouts_emitted"] == fresh


def test_reprocess_twice_gives_identical_files(runs, tmp_path):
    """A rerun on one machine with one configuration: the same batches, the same bytes."""
    again = str(tmp_path / "again")
    reprocess.reprocess(runs["full1"], {"segmentation": runs["edits"].segmentation,
                                        "output": again})
    assert _digests(again) == _digests(runs["reprocessed"])
    records = [json.loads(Path(root, "run.json").read_text()) for root in
               (again, runs["reprocessed"])]
    for record in records:
        record["config"].pop("output")
        record.pop("summary")  # what each run made: reprocessing embeds less
    assert records[0] == records[1]


def test_changed_ids_replace_the_fingerprint_pass(runs, tmp_path):
    edits = runs["edits"]
    (old, new), = edits.relabelled.items()  # ids from a proofreading log: a relabel is new
    out = str(tmp_path / "by_ids")
    summary = reprocess.reprocess(
        runs["full1"], {"segmentation": edits.segmentation, "output": out},
        changed_ids=edits.changed + edits.new + [new], removed_ids=edits.removed + [old])
    # The relabelled segment is new here: its nodes reuse the stale previous id's embeddings.
    reembedded = _check_contract(out, runs, {i: i for i in edits.unchanged})
    assert reembedded == summary.run.counters["embeddings"]
    assert summary.changes["new"] == len(edits.new) + 1
    assert summary.changes["removed"] == len(edits.removed) + 1


def test_previous_run_and_output_on_gcs(runs, gcs):
    previous = gcs.upload_dir(runs["full1"], "runs/full1")
    output = f"gs://{gcs.bucket}/runs/reprocessed"
    summary = reprocess.reprocess(previous, {"segmentation": runs["edits"].segmentation,
                                             "output": output})
    assert summary.changes == runs["summary"].changes
    # The same job with its files elsewhere: the same batches, so the same bits.
    remote, local = (_segments(f"{root}/raw") for root in (output, runs["reprocessed"]))
    assert sorted(remote) == sorted(local)
    for segment_id, expected in local.items():
        np.testing.assert_array_equal(remote[segment_id].embeddings, expected.embeddings)
    assert manifest.Manifest.open(output).info["tables"] == manifest.Manifest.open(
        runs["reprocessed"]).info["tables"]
    written = [m.path for m in FileSystems.match([f"{output}/**"])[0].metadata_list]
    assert written and not [p for p in written if "/." in p[len(output):]], "temporary files left"


def test_dataflow_translation_with_changed_ids(runs, tmp_path):
    from segclr_beam.runner import DataflowGpu

    edits = runs["edits"]
    out = tmp_path / "dataflow"
    beam_args = ["--runner=DataflowRunner", "--dry_run=True", "--project=segclr-test",
                 "--region=us-central1", "--temp_location=gs://segclr-test/tmp"]
    summary = reprocess.reprocess(
        runs["full1"], {"segmentation": edits.segmentation, "output": str(out)},
        changed_ids=edits.changed + edits.new, removed_ids=edits.removed, beam_args=beam_args,
        gpu=DataflowGpu("nvidia-l4", 1, "g2-standard-8", "us-docker.pkg.dev/p/r/segclr:1"))
    names = {t.unique_name for t in
             summary.run.result.job.proto_pipeline.components.transforms.values()}
    assert {"Classify", "SplitPrevious", "Points", "Embed", "Write", "Manifest", "Record"} <= names
    assert summary.changes == {} and not (out / "run.json").exists()


def test_missing_or_corrupt_manifest(runs, tmp_path):
    target = {"segmentation": runs["edits"].segmentation, "output": str(tmp_path / "out")}
    with pytest.raises(manifest.ManifestError, match="manifest/manifest.json: missing"):
        reprocess.reprocess(str(tmp_path), target)

    broken = tmp_path / "broken"
    shutil.copytree(runs["full1"], broken)
    info = broken / "manifest" / "manifest.json"
    text = info.read_text()
    info.write_text(text[:len(text) // 2])
    with pytest.raises(manifest.ManifestError, match=re.escape(f"{info}: corrupt manifest")):
        reprocess.reprocess(str(broken), target)

    info.write_text(text)
    shard = sorted((broken / "manifest" / "nodes").iterdir())[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(manifest.ManifestError,
                       match=re.escape(f"{shard}: {len(data) - 10} bytes")):
        reprocess.reprocess(str(broken), target)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    file, = (f for f in manifest.Manifest.open(str(broken)).files(manifest.NODES)
             if f.name == shard.name)
    with pytest.raises(manifest.ManifestError, match=re.escape(f"{shard}: corrupt")):
        manifest.read_table_file(str(shard), file)
    assert not (tmp_path / "out" / "run.json").exists()


def test_changed_parameters_refuse_unless_full(runs, tmp_path):
    target = {"segmentation": runs["edits"].segmentation, "output": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match=r"spacing_nm: previous 1500.0, now 3000.0.*--full"):
        reprocess.reprocess(runs["full1"], {**target, "spacing_nm": 3000.0})
    with pytest.raises(ConfigError, match="chunk_size: previous 64, now 32"):
        reprocess.reprocess(runs["full1"], {**target, "chunk_size": 32})
    with pytest.raises(ConfigError, match="output: .* is the previous run"):
        reprocess.reprocess(runs["full1"], {**target, "output": runs["full1"] + "/"})
    summary = reprocess.reprocess(runs["full1"], {**target, "spacing_nm": 3000.0}, full=True)
    assert summary.full and summary.run.counters["embeddings"] > 0
    recorded = manifest.Manifest.open(target["output"]).parameters
    assert recorded["skeleton"]["spacing_nm"] == 3000.0


def test_cli_reports_a_missing_manifest(tmp_path):
    from pipelines import reprocess as command

    with pytest.raises(SystemExit, match="manifest.json: missing"):
        command.main(["--previous", str(tmp_path), "--segmentation", str(tmp_path),
                      "--output", str(tmp_path / "out")])


def test_fingerprints_follow_voxels_not_ids():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(20, 12, 10)).astype(np.uint64) << np.uint64(62)
    top = int(labels.max())
    digests = manifest.chunk_digests(labels, (0, 0, 0))
    relabelled = np.where(labels == top, np.uint64(7), labels)
    assert manifest.chunk_digests(relabelled, (0, 0, 0))[7] == digests[top]
    assert manifest.chunk_digests(labels, (1, 0, 0))[top] != digests[top]
    edited = labels.copy()
    edited[0, 0, 0] = top if labels[0, 0, 0] != top else 0
    assert manifest.chunk_digests(edited, (0, 0, 0))[top] != digests[top]
    assert digests[top][1] == int((labels == top).sum())
    # Sorting in slabs gives the digest of the whole chunk at once.
    whole = hashlib.blake2b(np.asarray([0, 0, 0, *labels.shape], "<i8").tobytes(),
                            digest_size=manifest.DIGEST_SIZE)
    whole.update(np.flatnonzero(labels.reshape(-1) == top).astype("<u4"))
    assert digests[top][0] == whole.digest()


def test_only_binding_parameters_block_reuse():
    previous = {"model": {"model_id": "a", "weights": "x"}, "cutout_size": 33,
                "skeleton": {"spacing_nm": 1500.0, "min_voxels": 1000}, "radii_nm": [1.0]}
    same = {**previous, "model": {"model_id": "a", "weights": "moved"}, "radii_nm": [2.0]}
    assert manifest.differences(previous, same) == []
    other = {**previous, "model": {"model_id": "b"},
             "skeleton": {"spacing_nm": 1500.0, "min_voxels": 10}}
    assert manifest.differences(previous, other) == [
        "model: previous a, now b", "min_voxels: previous 1000, now 10"]


def test_the_fingerprint_job_asks_dataflow_for_no_gpu(runs, tmp_path, monkeypatch):
    from apache_beam.options.pipeline_options import GoogleCloudOptions, WorkerOptions

    from segclr_beam.runner import DataflowGpu

    first_jobs = []
    build_first = reprocess.classify_pipeline

    def recording(*args):
        p = build_first(*args)
        run = p.run
        p.run = lambda: first_jobs.append(run()) or first_jobs[-1]
        return p

    monkeypatch.setattr(reprocess, "classify_pipeline", recording)
    monkeypatch.setattr(reprocess, "_read_ids", lambda path: [])  # a dry run stages nothing
    monkeypatch.setattr(reprocess, "counters", lambda result: {})  # and counts nothing
    beam_args = ["--runner=DataflowRunner", "--dry_run=True", "--project=segclr-test",
                 "--region=us-central1", "--temp_location=gs://segclr-test/tmp"]
    image = "us-docker.pkg.dev/p/r/segclr:1"
    summary = reprocess.reprocess(
        runs["full1"], {"segmentation": runs["edits"].segmentation,
                        "output": str(tmp_path / "dataflow")},
        beam_args=beam_args, gpu=DataflowGpu("nvidia-l4", 1, "g2-standard-8", image))
    first, = (r.job.options for r in first_jobs)
    second = summary.run.result.job.options
    assert not first.view_as(GoogleCloudOptions).dataflow_service_options
    assert first.view_as(WorkerOptions).sdk_container_image == image
    assert second.view_as(GoogleCloudOptions).dataflow_service_options == [
        "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
