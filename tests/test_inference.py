"""Batched inference of an exported SegCLR model, bare and inside a Beam pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import BeamAssertException, assert_that

from segclr_beam import model as segclr_model
from segclr_beam.inference import Embed, SegclrModelHandler
from segclr_beam.model import Architecture
from segclr_beam.records import Point
# Beam's batches and the direct call's differ: the embeddings agree to the batch tolerance.
from tolerance import assert_embeddings_close as assert_close

REPO = Path(__file__).resolve().parents[1]
ARCH = Architecture(widths=(4, 8, 8, 16), input_size=33, bottleneck_width=16, embedding_dim=8)
SEED = 11


def cutouts_of(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, ARCH.input_size, ARCH.input_size, ARCH.input_size),
                        dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("models") / "segclr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segclr_model.export_saved_model(str(out), ARCH, seed=SEED)
    return str(out)


@pytest.fixture(scope="module")
def network():
    """The Keras network holding the exported weights."""
    network = segclr_model.build_model(ARCH)
    segclr_model.random_init(network, SEED)
    return network


def test_handler_pads_the_last_batch_and_returns_only_embeddings(exported, network):
    handler = SegclrModelHandler(exported, batch_size=4)
    cutouts = cutouts_of(6, seed=1)
    embeddings = handler.run_inference(list(cutouts), handler.load_model())
    assert len(embeddings) == 6
    assert all(e.dtype == np.float32 and e.shape == (ARCH.embedding_dim,) for e in embeddings)
    assert_close(np.stack(embeddings), segclr_model.embed(network, cutouts))
    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}
    assert handler.get_num_bytes(list(cutouts)) == cutouts.nbytes


def test_handler_rejects_cutouts_the_model_cannot_take(exported):
    handler = SegclrModelHandler(exported, batch_size=2)
    model = handler.load_model()
    good = cutouts_of(1, seed=2)[0]
    with pytest.raises(ValueError, match=r"cutout 1 of a batch is float32 \(33, 33, 33\); .* "
                                         r"takes uint8 \(33, 33, 33\)"):
        handler.run_inference([good, good.astype(np.float32)], model)
    with pytest.raises(ValueError, match=r"cutout 0 of a batch is uint8 \(33, 33, 32\)"):
        handler.run_inference([good[:, :, :32]], model)
    with pytest.raises(ValueError, match="not a SegCLR model"):
        SegclrModelHandler(str(REPO / "tests"), batch_size=4)
    with pytest.raises(ValueError, match="model_copies=2 needs share_model_across_processes"):
        SegclrModelHandler(exported, batch_size=4, model_copies=2)


@pytest.mark.parametrize("share", [False, True], ids=["per-process", "shared"])
def test_embed_in_beam_returns_each_key_once_with_its_own_embedding(exported, network, share):
    cutouts = cutouts_of(10, seed=3)
    points = [Point(segment_id=100 + i % 3, node_id=i, x=i, y=2 * i, z=3 * i) for i in range(10)]
    expected = dict(zip(points, segclr_model.embed(network, cutouts)))

    def check(results):
        keys = [key for key, _ in results]
        if sorted(keys) != sorted(points):
            raise BeamAssertException(f"keys {keys} are not each point once")
        for key, embedding in results:
            if embedding.dtype != np.float32 or embedding.shape != (ARCH.embedding_dim,):
                raise BeamAssertException(f"{key}: embedding {embedding.dtype} {embedding.shape}")
            assert_close(embedding, expected[key])

    pipeline = beam.Pipeline(runner="FnApiRunner")
    embeddings = (pipeline
                  | beam.Create(list(zip(points, cutouts)))
                  | Embed(exported, batch_size=4, share_model_across_processes=share))
    assert_that(embeddings, check)
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in
                result.metrics().query(MetricsFilter().with_namespace("segclr"))["counters"]}
    assert counters["embeddings"] == 10
    assert counters["inference_batches"] == 3  # 4 + 4 + a padded 2, in one bundle


def test_models_on_gcs(exported, network, gcs):
    remote = gcs.upload_dir(exported, "models/segclr")
    handler = SegclrModelHandler(remote, batch_size=3)
    assert handler.identity == segclr_model.model_identity(exported)
    cutouts = cutouts_of(2, seed=4)
    assert_close(handler.load_model().embed(cutouts), segclr_model.embed(network, cutouts))

    written = f"gs://{gcs.bucket}/models/written"
    with pytest.warns(UserWarning, match="RANDOM"):
        identity = segclr_model.export_saved_model(written, ARCH, seed=SEED)
    assert identity == segclr_model.model_identity(exported)
    assert_close(SegclrModelHandler(written, batch_size=3).load_model().embed(cutouts),
                 segclr_model.embed(network, cutouts))
    with pytest.raises(FileExistsError, match="already exists"):
        segclr_model.export_saved_model(written, ARCH, seed=SEED)


def test_exports_without_a_graph_record_still_run(exported, network, tmp_path):
    """A model exported before the serving form: the Keras layers behind the signature."""
    plain = tf.Module()
    plain.network = network
    plain.serve = tf.function(
        lambda cutouts: {"embeddings": network(segclr_model.preprocess(cutouts), training=False)},
        input_signature=[tf.TensorSpec([None] + [ARCH.input_size] * 3, tf.uint8)])
    old = tmp_path / "old"
    tf.saved_model.save(plain, str(old), signatures={"serving_default": plain.serve})
    identity = segclr_model.model_identity(exported)
    del identity["graph"]
    (old / segclr_model.IDENTITY_FILE).parent.mkdir()
    (old / segclr_model.IDENTITY_FILE).write_text(json.dumps(identity))

    handler = SegclrModelHandler(str(old), batch_size=2)
    assert handler.identity["graph"] == {"stem": "conv", "folded_batch_norm": []}
    cutouts = cutouts_of(3, seed=5)
    assert_close(np.stack(handler.run_inference(list(cutouts), handler.load_model())),
                 segclr_model.embed(network, cutouts))
    assert segclr_model.model_identity(exported)["graph"]["folded_batch_norm"]


_FRESH_PROCESS = """
import sys
import numpy as np
import tensorflow as tf
from segclr_beam.inference import SegclrModelHandler
handler = SegclrModelHandler(sys.argv[1], batch_size=2, intra_op_threads=1, inter_op_threads=1)
model = handler.load_model()
assert tf.config.threading.get_intra_op_parallelism_threads() == 1
assert tf.config.threading.get_inter_op_parallelism_threads() == 1
print(model.embed(np.zeros((1, 33, 33, 33), np.uint8)).shape)
"""


def test_thread_settings_apply_in_a_fresh_worker_process(exported):
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, exported], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"(1, {ARCH.embedding_dim})"
