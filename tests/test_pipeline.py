"""The whole job on a small synthetic region: outputs complete, exact, repeatable, and on GCS."""

from __future__ import annotations

import glob
import os
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

BBOX = (0, 0, 0, 128, 128, 96)
CUTOUT = 33


def _config(dataset, model_dir, out, **overrides) -> EmbedConfig:
    return EmbedConfig(em=dataset.em, segmentation=dataset.segmentation, model=model_dir,
                       output=str(out), bbox=BBOX, chunk_size=64, block_size=64,
                       cutout_size=CUTOUT, batch_size=8, num_shards=16, bytewidth=8,
                       **overrides)


@pytest.fixture(scope="module")
def local_run(synthetic_dataset, small_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = pipeline.run(_config(synthetic_dataset, small_model, out))
    return out, summary


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
    assert summary.counters["embeddings"] == len(expected)
    assert set(summary.outputs) == {"raw", "agg10um", "agg25um"}
    for name in summary.outputs:
        reader = EmbeddingReader(str(out / name))
        from_csv = sorted((s, int(n)) for s in {seg for seg, _ in expected}
                          for n in reader.read_segment(s).node_ids)
        assert from_csv == expected, name
        assert sorted(_tfrecord_nodes(out / name)) == expected, name


def test_raw_embedding_is_the_model_on_its_own_cutout(local_run, synthetic_dataset, small_model):
    out, _ = local_run
    sample = sorted(points.read_points(str(out / POINTS_FILE)))[::7][:16]
    em = ts.open({"driver": "neuroglancer_precomputed",
                  "kvstore": f"file://{synthetic_dataset.em}/"}).result()
    segmentation = ts.open({"driver": "neuroglancer_precomputed",
                            "kvstore": f"file://{synthetic_dataset.segmentation}/"}).result()
    shape = np.array(em.shape[:3])
    half = CUTOUT // 2
    cutouts = []
    for p in sample:
        lo = np.array([p.x, p.y, p.z]) - half
        window_em = np.zeros((CUTOUT,) * 3, np.uint8)
        window_seg = np.zeros((CUTOUT,) * 3, np.uint64)
        a, b = np.maximum(lo, 0), np.minimum(lo + CUTOUT, shape)
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


def test_rerun_is_byte_identical_and_refuses_to_overwrite(local_run, synthetic_dataset,
                                                          small_model, tmp_path):
    out, _ = local_run
    again = tmp_path / "again"
    pipeline.run(_config(synthetic_dataset, small_model, again))
    first, second = _files(out), _files(again)
    assert first.keys() == second.keys() and first == second
    with pytest.raises(ConfigError, match=r"output: .* holds a previous run"):
        pipeline.run(_config(synthetic_dataset, small_model, again))
    pipeline.run(_config(synthetic_dataset, small_model, again, overwrite=True))
    assert _files(again) == first


def test_volumes_model_and_output_on_gcs(local_run, synthetic_dataset, small_model, gcs):
    from apache_beam.io.filesystems import FileSystems

    out, _ = local_run
    em = gcs.upload_dir(synthetic_dataset.em, "data/em")
    segmentation = gcs.upload_dir(synthetic_dataset.segmentation, "data/segmentation")
    model_dir = gcs.upload_dir(small_model, "models/small")
    remote = f"gs://{gcs.bucket}/runs/out"
    config = _config(synthetic_dataset, model_dir, remote).updated(
        {"em": em, "segmentation": segmentation})
    pipeline.run(config)
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
def test_bad_configuration_fails_before_any_work(change, message, synthetic_dataset,
                                                 small_model, tmp_path):
    config = _config(synthetic_dataset, small_model, tmp_path / "out").updated(change)
    with pytest.raises(ConfigError, match=message):
        pipeline.run(config)
    assert not os.path.exists(tmp_path / "out" / POINTS_FILE)


def test_dataflow_translation_with_gpu_workers(synthetic_dataset, small_model, tmp_path):
    from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, WorkerOptions
    from apache_beam.portability.api import beam_runner_api_pb2

    from segclr_beam.runner import DataflowGpu

    image = "us-docker.pkg.dev/segclr-test/images/segclr-beam:1"
    beam_args = ["--runner=DataflowRunner", "--dry_run=True", "--project=segclr-test",
                 "--region=us-central1", "--temp_location=gs://segclr-test/tmp"]
    summary = pipeline.run(_config(synthetic_dataset, small_model, tmp_path / "out"), beam_args,
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
