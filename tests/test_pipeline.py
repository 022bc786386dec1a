"""The whole job on a small synthetic region: outputs complete, exact, repeatable, and on GCS."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorstore as ts

from segclr_beam import pipeline, points
from segclr_beam.job import POINTS_FILE, RUN_FILE
from segclr_beam.config import ConfigError, EmbedConfig
from segclr_beam.reader import EmbeddingReader
from tolerance import assert_embeddings_close

@pytest.fixture
def local_run(small_run) -> tuple[Path, dict]:
    """The small run (conftest.py) and the summary its run.json records."""
    out = Path(small_run)
    return out, json.loads((out / RUN_FILE).read_text())["summary"]


def _files(root: Path) -> dict[str, bytes]:
    """Every output file below `root` except the run record, which names its own paths."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != RUN_FILE}


def _tfrecord_nodes(tree: Path) -> list[tuple[int, int]]:
    spec = {"skeleton_id": tf.io.FixedLenFeature([1], tf.int64),
            "node_id": tf.io.FixedLenFeature([1], tf.int64),
            "center": tf.io.FixedLenFeature([3], tf.int64),
            "embeddings": tf.io.FixedLenFeature([8], tf.float32)}
    nodes = []
    for record in tf.data.TFRecordDataset(sorted(glob.glob(str(tree / "*.tfrecord")))):
        example = tf.io.parse_single_example(record, spec)
        segment = int(np.int64(example["skeleton_id"].numpy()[0]).view(np.uint64))
        nodes.append((segment, int(example["node_id"].numpy()[0])))
    return nodes


def test_every_node_once_in_every_variant_and_format(local_run):
    out, summary = local_run
    sample = points.read_points(str(out / POINTS_FILE))
    expected = sorted((p.segment_id, p.node_id) for p in sample)
    assert len(expected) > 50 and len(set(expected)) == len(expected)
    assert summary["embeddings"] == len(expected)
    assert set(summary["trees"]) == {"raw", "agg10um", "agg25um"}
    for name in summary["trees"]:
        reader = EmbeddingReader(str(out / name))
        from_csv = sorted((s, int(n)) for s in {seg for seg, _ in expected}
                          for n in reader.read_segment(s).node_ids)
        assert from_csv == expected, name
        assert sorted(_tfrecord_nodes(out / name)) == expected, name


def test_raw_embedding_is_the_model_on_its_own_cutout(local_run, synthetic_dataset, small_model,
                                                      small_config):
    out, _ = local_run
    cutout = small_config(out).cutout_size
    sample = sorted(points.read_points(str(out / POINTS_FILE)))[::7][:16]
    em = ts.open({"driver": "neuroglancer_precomputed",
                  "kvstore": f"file://{synthetic_dataset.em}/"}).result()
    segmentation = ts.open({"driver": "neuroglancer_precomputed",
                            "kvstore": f"file://{synthetic_dataset.segmentation}/"}).result()
    shape = np.array(em.shape[:3])
    half = cutout // 2
    cutouts = []
    for p in sample:
        lo = np.array([p.x, p.y, p.z]) - half
        window_em = np.zeros((cutout,) * 3, np.uint8)
        window_seg = np.zeros((cutout,) * 3, np.uint64)
        a, b = np.maximum(lo, 0), np.minimum(lo + cutout, shape)
        inside = tuple(slice(s - l, e - l) for s, e, l in zip(a, b, lo))
        stored = tuple(slice(s, e) for s, e in zip(a, b))
        window_em[inside] = em[stored + (0,)].read().result()
        window_seg[inside] = segmentation[stored + (0,)].read().result()
        cutouts.append(np.where(window_seg == p.segment_id, window_em, 0).transpose(2, 1, 0))
    serve = tf.saved_model.load(small_model).signatures["serving_default"]
    direct = serve(cutouts=tf.constant(np.stack(cutouts)))["embeddings"].numpy()
    reader = EmbeddingReader(str(out / "raw"))
    for p, expected in zip(sample, direct):
        segment = reader.read_segment(p.segment_id)
        row = int(np.flatnonzero(segment.node_ids == p.node_id)[0])
        np.testing.assert_array_equal(segment.xyz[row], [p.x, p.y, p.z])
        # One batch of the sample here, batches of block neighbours in the job.
        assert_embeddings_close(segment.embeddings[row], expected, f"node {p}")


def test_rerun_is_byte_identical_and_refuses_to_overwrite(local_run, small_config, tmp_path):
    """A previous run at the output, every file of it replaced by other bytes and a stray
    shard added: refused, then with --overwrite the same files as the first run, byte for
    byte (the rerun starts from an output emptied of the previous run's entries)."""
    out, _ = local_run
    first = _files(out)
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for name in first:
        (again / name).write_bytes(b"stale")
    (again / "raw" / "99.zip").write_bytes(b"stale")
    config = small_config(again, write_skeletons=True)
    with pytest.raises(ConfigError, match=r"output: .* holds a previous run"):
        pipeline.run(config)
    assert (again / "raw" / "99.zip").exists()
    pipeline.run(config.updated({"overwrite": True}))
    second = _files(again)
    assert second.keys() == first.keys() and second == first


def test_volumes_model_and_output_on_gcs(local_run, synthetic_dataset, small_model,
                                        small_config, gcs):
    from apache_beam.io.filesystems import FileSystems

    out, _ = local_run
    em = gcs.upload_dir(synthetic_dataset.em, "data/em")
    segmentation = gcs.upload_dir(synthetic_dataset.segmentation, "data/segmentation")
    model_dir = gcs.upload_dir(small_model, "models/small")
    remote = f"gs://{gcs.bucket}/runs/out"
    pipeline.run(small_config(remote, em=em, segmentation=segmentation, model=model_dir,
                              write_skeletons=True))
    local = _files(out)
    for name, data in local.items():
        if name.endswith(".json"):
            continue  # info and manifest files name the volumes and model, elsewhere here
        with FileSystems.open(f"{remote}/{name}") as f:
            assert f.read() == data, name


@pytest.mark.parametrize("change, message", [
    ({"model": "/nonexistent/model"}, r"model: /nonexistent/model is neither a SavedModel"),
    ({"resolution": (8.0, 8.0, 8.0)}, r"volumes: EM: no scale at resolution 8 x 8 x 8 nm"),
    ({"radii_nm": (10000.0, -5.0)}, r"radii_nm: every radius must be > 0"),
    ({"output": "/proc/segclr-out"}, r"output: cannot write to /proc/segclr-out"),
    ({"bbox": (500, 500, 500, 600, 600, 600)}, r"bbox: .* outside the volumes"),
])
def test_bad_configuration_fails_before_any_work(change, message, small_config, tmp_path):
    config = small_config(tmp_path / "out").updated(change)
    with pytest.raises(ConfigError, match=message):
        pipeline.run(config)
    assert not os.path.exists(tmp_path / "out" / POINTS_FILE)


def test_dataflow_translation_with_gpu_workers(small_config, tmp_path):
    from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, WorkerOptions
    from apache_beam.portability.api import beam_runner_api_pb2

    from segclr_beam.runner import DataflowGpu

    image = "us-docker.pkg.dev/segclr-test/images/segclr-beam:1"
    beam_args = ["--runner=DataflowRunner", "--dry_run=True", "--project=segclr-test",
                 "--region=us-central1", "--temp_location=gs://segclr-test/tmp"]
    summary = pipeline.run(small_config(tmp_path / "out"), beam_args,
                           DataflowGpu("nvidia-l4", 1, "g2-standard-8", image))
    job = summary.result.job
    assert job.options.view_as(GoogleCloudOptions).dataflow_service_options == [
        "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert {"no_use_multiple_sdk_containers", "use_runner_v2"} <= set(
        job.options.view_as(DebugOptions).experiments)
    assert job.options.view_as(WorkerOptions).machine_type == "g2-standard-8"
    environments = job.proto_pipeline.components.environments.values()
    images = {beam_runner_api_pb2.DockerPayload.FromString(e.payload).container_image
              for e in environments if e.urn == "beam:env:docker:v1"}
    assert images == {image}
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert set(pipeline.STAGES) <= names
    assert not os.path.exists(tmp_path / "out" / POINTS_FILE)


def test_embed_command_names_the_missing_field(capsys):
    from segclr_beam import cli

    with pytest.raises(SystemExit, match="segclr-beam embed: segmentation: required"):
        cli.main(["embed", "--em", "x", "--model", "m", "--output", "o"])


# Refusals, leftovers and reports ------------------------------------------------------------

def _entries(out: Path) -> list[str]:
    """What a run left at `out` (nothing for a failed or refused run)."""
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def _embed_args(config: EmbedConfig, *extra) -> list[str]:
    """The embed command's arguments for `config`'s volumes, model, output and settings."""
    flags = {name: getattr(config, name) for name in (
        "em", "segmentation", "model", "output", "bbox", "chunk_size", "block_size",
        "cutout_size", "batch_size", "num_shards", "bytewidth")}
    return ["embed", *(a for name, value in flags.items() for a in (
        "--" + name.replace("_", "-"),
        ",".join(map(str, value)) if isinstance(value, tuple) else str(value))), *extra]


def test_points_whose_segment_is_absent_fail_naming_them_or_are_skipped(
        local_run, small_config, tmp_path):
    from segclr_beam import cli

    out, _ = local_run
    sample = sorted(points.read_points(str(out / POINTS_FILE)))[::13][:12]
    table = tmp_path / "table.csv"
    rows = [f"{p.segment_id},{p.node_id},{p.x},{p.y},{p.z}" for p in sample]
    rows.append(f"12345,0,{sample[0].x},{sample[0].y},{sample[0].z}")  # no such segment
    table.write_text("segment_id,node_id,x,y,z\n" + "\n".join(rows) + "\n")
    failed = tmp_path / "failed"
    args = _embed_args(small_config(failed), "--points", str(table))
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    message = str(exit.value)
    assert message.startswith("segclr-beam embed: 1 point(s) whose segment does not occur in "
                              "its 33^3 cutout window")
    assert (f"segment 12345 node 0 at voxel ({sample[0].x}, {sample[0].y}, {sample[0].z})"
            in message and "Traceback" not in message)
    assert _entries(failed) == []  # the failed run left nothing, not even its lock

    summary = pipeline.run(small_config(tmp_path / "skipped", points=str(table),
                                        skip_absent=True))
    totals = summary.totals()
    assert (totals["points_segment_absent"], totals["embeddings"], totals["points"]) == (1, 12, 12)
    assert sorted(points.read_points(str(tmp_path / "skipped" / POINTS_FILE))) == sample
    record = json.loads((tmp_path / "skipped" / RUN_FILE).read_text())
    assert record["summary"]["points_segment_absent"] == 1


def test_absent_segmentation_chunks_fail_the_run_or_are_counted(local_run, synthetic_dataset,
                                                                small_config, tmp_path):
    damaged = tmp_path / "segmentation"
    shutil.copytree(synthetic_dataset.segmentation, damaged)
    for name in ("0-64_0-64_0-64", "64-128_64-128_0-64", "0-64_64-128_64-128"):
        (damaged / "32_32_33" / name).unlink()
    # Every chunk of the box is read, whatever the segments; one segment (with a point in
    # storage chunks that are kept) is enough to embed.
    out, _ = local_run
    kept = next(p.segment_id for p in points.read_points(str(out / POINTS_FILE))
                if p.x >= 64 and p.y < 64)
    config = small_config(tmp_path / "strict", segmentation=str(damaged), segments=(kept,))
    with pytest.raises(Exception, match=r"segmentation: 1 storage chunks inside the box are "
                                         r"absent \(chunk origins \(\d+, \d+, \d+\)\), more than "
                                         r"the 0 tolerated"):
        pipeline.run(config)
    assert _entries(tmp_path / "strict") == []
    tolerant = config.updated({"output": str(tmp_path / "tolerant"), "max_absent_chunks": 3})
    summary = pipeline.run(tolerant)
    assert summary.totals()["absent_chunks"]["segmentation_skeletons"] == 3
    assert "segmentation 3 (skeletons)" in summary.report()
    record = json.loads((tmp_path / "tolerant" / RUN_FILE).read_text())
    assert record["summary"]["absent_chunks"]["segmentation_skeletons"] == 3


def _zero_segmentation(dataset, path: Path) -> str:
    """A copy of the dataset's segmentation holding only background, every chunk stored."""
    shutil.copytree(dataset.segmentation, path)
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{path}/",
                     "store_data_equal_to_fill_value": True}).result()
    store.write(np.zeros(store.shape, np.uint64)).result()
    return str(path)


def test_inputs_that_give_no_points_are_refused(local_run, synthetic_dataset, small_config,
                                                tmp_path):
    out, _ = local_run
    present = points.read_points(str(out / POINTS_FILE))[0].segment_id
    header_only = tmp_path / "empty.csv"
    header_only.write_text("segment_id,x,y,z\n")
    cases = [
        ({"points": str(header_only)}, rf"points {header_only}: no points, so nothing to embed"),
        ({"segments": (present, 12345)}, r"segments: 1 of the 2 listed segment ids have no point "
                                         r"in the skeletons of segmentation .*: 12345 "),
        ({"segmentation": _zero_segmentation(synthetic_dataset, tmp_path / "zeros")},
         r"the skeletons of segmentation .*zeros in box .*: no points, so nothing to embed"),
    ]
    for i, (change, message) in enumerate(cases):
        target = tmp_path / f"out{i}"
        with pytest.raises(Exception, match=message):
            pipeline.run(small_config(target).updated(change))
        assert _entries(target) == [], change


def test_damaged_model_and_mismatched_volumes_are_refused_before_work(
        synthetic_dataset, small_model, small_config, tmp_path):
    no_variables = tmp_path / "model"
    shutil.copytree(small_model, no_variables, ignore=shutil.ignore_patterns("variables"))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=rf"model: {no_variables}: its variables cannot be "
                                          "read"):
        pipeline.run(small_config(out, model=str(no_variables)))
    assert _entries(out) == []
    small_em = tmp_path / "em"
    shutil.copytree(synthetic_dataset.em, small_em)
    info = json.loads((small_em / "info").read_text())
    info["scales"][0]["size"] = [128, 192, 128]  # the info says less than the data holds
    (small_em / "info").write_text(json.dumps(info))
    config = small_config(out, em=str(small_em))
    config.bbox = None
    with pytest.raises(ConfigError, match=r"bbox: the EM's voxels \[0,0,0 \.\. 128,192,128\) "
                                          r"and the segmentation's \[0,0,0 \.\. 192,192,128\) "
                                          r"differ, so the whole volume is not one box; "
                                          r"give --bbox \(their overlap is 0,0,0,128,192,128\)"):
        pipeline.run(config)
    with pytest.raises(ConfigError, match=r"bbox: .* leaves the EM's voxels"):
        pipeline.run(config.updated({"bbox": (64, 0, 0, 160, 128, 96)}))
    with pytest.raises(ConfigError, match="volumes: segmentation: is the EM volume itself"):
        pipeline.run(config.updated({"segmentation": str(small_em)}))
    assert _entries(out) == []


def test_one_run_per_output_and_leftovers_removed_first(small_config, tmp_path):
    from segclr_beam.job import prepare
    from segclr_beam.lock import LOCK_FILE, OutputLock

    out = tmp_path / "out"
    config = small_config(out)
    held = OutputLock.acquire(str(out))
    with pytest.raises(ConfigError, match=rf"output: run {held.run_id} .* is writing to this "
                                          rf"output \({out}/{LOCK_FILE}\)"):
        pipeline.run(config)
    held.release()
    # What a killed run leaves: the points file, staging directories, a partial tree.
    (out / POINTS_FILE).write_bytes(b"partial")
    (out / ".segclr-temp-0123abcd").mkdir()
    (out / ".segclr-temp-0123abcd" / "0.zip").write_bytes(b"")
    (out / "agg10um").mkdir()
    (out / "agg10um" / "3.zip").write_bytes(b"")
    (out / "model").mkdir()  # an exported checkpoint
    (out / "notes.txt").write_text("not the run's")
    job = prepare(config)
    assert _entries(out) == [LOCK_FILE, "notes.txt"]
    job.claim.finish()
    assert _entries(out) == ["notes.txt"]
    (out / RUN_FILE).write_text("{}")  # a complete run is kept unless --overwrite
    with pytest.raises(ConfigError, match="holds a previous run"):
        prepare(config)
    assert _entries(out) == ["notes.txt", RUN_FILE]


def test_a_checkpoint_is_exported_again_when_overwriting(small_config, tmp_path, monkeypatch):
    from segclr_beam import job, model
    from test_model import SMALL, small_values, write_tf1_checkpoint

    prefix = write_tf1_checkpoint(tmp_path / "model.ckpt", small_values())
    export = model.export_saved_model
    monkeypatch.setattr(job.model, "export_saved_model",
                        lambda out, checkpoint: export(out, SMALL, checkpoint=checkpoint))
    config = small_config(tmp_path / "out", model=prefix)
    first = job.prepare(config)
    first.claim.finish()
    (tmp_path / "out" / RUN_FILE).write_text("{}")
    again = job.prepare(config.updated({"overwrite": True}))
    assert again.model_dir == first.model_dir == str(tmp_path / "out" / "model")
    assert again.model == first.model
    again.claim.finish()


def test_run_json_waits_for_every_written_file(small_config, tmp_path):
    import apache_beam as beam

    from segclr_beam.job import prepare

    job = prepare(small_config(tmp_path / "out"))
    p = beam.Pipeline(runner="FnApiRunner")
    pipeline.build(p, job)
    components = p.to_runner_api().components
    producer = {pc: name for name, t in components.transforms.items() for pc in t.outputs.values()}

    def upstream(name, seen):
        for pc in components.transforms[name].inputs.values():
            if pc in producer and producer[pc] not in seen:
                seen.add(producer[pc])
                upstream(producer[pc], seen)
        return seen

    record = next(n for n, t in components.transforms.items() if t.unique_name == "Record")
    names = {components.transforms[n].unique_name.split("/")[0] for n in upstream(record, set())}
    assert {"WritePoints", "Write", "Manifest"} <= names
    job.claim.finish()


def test_overwrite_replaces_every_tree_and_embed_reports_what_it_made(
        local_run, small_config, tmp_path, capsys):
    from segclr_beam import cli

    out, _ = local_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    previous = points.read_points(str(out / POINTS_FILE))
    chosen = sorted({p.segment_id for p in previous})[::4]
    cli.main(_embed_args(small_config(again), "--overwrite", "--radii-nm", "5000",
                         "--num-shards", "7", "--tfrecord-shards", "7",
                         "--segments", ",".join(map(str, chosen))))
    printed = capsys.readouterr().out
    embeddings = sum(p.segment_id in chosen for p in previous)
    assert embeddings > 10
    assert f"points: {embeddings}, cutouts: {embeddings}, embeddings: {embeddings}" in printed
    assert "seconds per stage: Points" in printed and f"agg5um: {again}/agg5um" in printed
    assert _entries(again) == ["agg5um", "annotations", "manifest", POINTS_FILE, "raw", RUN_FILE]
    for tree in ("raw", "agg5um"):
        assert len(list((again / tree).glob("*.tfrecord"))) == 7
        assert len(list((again / tree).glob("*.zip"))) <= 7
    assert json.loads((again / RUN_FILE).read_text())["summary"]["embeddings"] == embeddings


def test_a_mistyped_flag_is_an_error(capsys):
    from segclr_beam import cli

    with pytest.raises(SystemExit) as exit:
        cli.main(["embed", "--em", "e", "--segmentation", "s", "--model", "m", "--output", "o",
                  "--radi-nm", "5000"])
    assert exit.value.code == 2
    assert ("unrecognized argument --radi-nm (did you mean --radii-nm?)"
            in capsys.readouterr().err)
