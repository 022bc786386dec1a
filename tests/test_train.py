"""Training: pair tables, views, the loss, checkpoints in and out, resume, devices, GCS."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pairs import sample_pairs, write_pair_table
from segclr_beam import model as segclr_model
from segclr_beam import records, synth, train, views, volume
from segclr_beam.model import Architecture, CheckpointMismatchError
from test_model import (published_variables, random_values, write_tf1_checkpoint,
                        write_tf2resaved_checkpoint)

REPO = Path(__file__).resolve().parents[1]
TINY = Architecture(widths=(4, 8, 8, 16), input_size=17, bottleneck_width=16, embedding_dim=8)
# The training runs' network: TINY on 33^3 views (1 um). On neuropil a 17^3 view (0.5 um)
# inside a dendrite, soma or glia cell is one segment's texture without shape, and 30 steps
# learn nothing that matches a pair's views (their loss stays at its initial level).
LEARNER = dataclasses.replace(TINY, input_size=33)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synth.write_dataset(tmp_path_factory.mktemp("train") / "dataset", shape=(96, 96, 64),
                               seed=0)


@pytest.fixture(scope="module")
def labels(dataset) -> np.ndarray:
    _, segmentation = volume.open_volumes(dataset.em, dataset.segmentation)
    return segmentation.read(segmentation.bounds)


@pytest.fixture(scope="module")
def pair_table(tmp_path_factory, labels) -> str:
    root = tmp_path_factory.mktemp("pairs")
    return write_pair_table(str(root / "pairs.tfrecord"), sample_pairs(labels, 256, 4, seed=1))


def config(dataset, pair_table, out, **overrides) -> train.TrainConfig:
    values = dict(pairs=pair_table, em=dataset.em, segmentation=dataset.segmentation,
                  out=str(out), architecture=LEARNER, steps=30, batch_size=8, learning_rate=3e-3,
                  warmup_steps=2, checkpoint_every=5, log_every=5)
    return train.TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, pair_table):
    """One uninterrupted run of 30 steps: its config, record and per-step losses."""
    cfg = config(dataset, pair_table, tmp_path_factory.mktemp("run") / "out")
    losses = []
    record = train.train(cfg, on_step=lambda step, loss: losses.append(loss))
    return cfg, record, losses


# ---------------------------------------------------------------- pieces against references


@pytest.mark.parametrize("size,kernel,cin", [(17, 7, 1), (9, 3, 8), (8, 3, 4), (5, 3, 2)])
def test_space_to_depth_conv_is_the_strided_convolution(size, kernel, cin):
    rng = np.random.default_rng(size)
    x = tf.constant(rng.normal(size=(2, size, size, size, cin)), tf.float32)
    w = tf.Variable(rng.normal(size=(kernel, kernel, kernel, cin, 3)), dtype=tf.float32)
    results = []
    for conv in (lambda: tf.nn.conv3d(x, w, [1, 2, 2, 2, 1], "SAME"),
                 lambda: train.space_to_depth_conv(x, w, 2)):
        with tf.GradientTape() as tape:
            y = conv()
            loss = tf.reduce_sum(y * y)
        results.append((y.numpy(), tape.gradient(loss, w).numpy()))
    (y, grad), (y2, grad2) = results
    # float32 sums in another order: relative error near 1e-6.
    assert np.abs(y2 - y).max() <= 1e-5 * np.abs(y).max()
    assert np.abs(grad2 - grad).max() <= 1e-5 * np.abs(grad).max()


def test_training_network_computes_the_published_network():
    network, reference = train.training_network(TINY), segclr_model.build_model(TINY)
    segclr_model.random_init(reference, seed=3)
    weights = segclr_model.checkpoint_weights(network)
    assert set(weights) == set(segclr_model.checkpoint_weights(reference))
    for name, w in segclr_model.checkpoint_weights(reference).items():
        weights[name].assign(w.numpy())
    x = np.random.default_rng(0).random((3, 17, 17, 17, 1), dtype=np.float32)
    expected = reference(x, training=False).numpy()
    assert np.abs(network(x, training=False).numpy() - expected).max() <= 1e-5 * np.abs(
        expected).max()


def reference_nt_xent(z: np.ndarray, temperature: float) -> float:
    """SimCLR NT-Xent written out: rows i and i + B are the two views of pair i."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    total = 0.0
    for i in range(n):
        partner = (i + n // 2) % n
        scores = np.array([z[i] @ z[j] / temperature for j in range(n) if j != i])
        others = [j for j in range(n) if j != i]
        total += -(scores[others.index(partner)] - np.log(np.exp(scores).sum()))
    return total / n


def test_nt_xent_matches_reference():
    z = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    loss, _ = train.nt_xent(tf.constant(z), 0.1, 6)
    assert float(loss) == pytest.approx(reference_nt_xent(z.astype(np.float64), 0.1), rel=1e-5)


def test_partner_accuracy_counts_views_whose_nearest_view_is_their_partner():
    # Every pair's views are close, but pair 4's second view is moved next to pair 0's first:
    # those two views find each other, not their partners.
    rng = np.random.default_rng(1)
    first = rng.normal(size=(6, 8))
    second = first + 0.01 * rng.normal(size=(6, 8))
    second[4] = first[0] + 0.001 * rng.normal(size=8)  # nearer view 0 than its partner
    z = np.concatenate([first, second]).astype(np.float32)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    expected = np.mean(similarity.argmax(axis=1) == np.r_[np.arange(6) + 6, np.arange(6)])
    assert 0.5 < expected < 1  # pair 4's views and view 0 miss their partners
    loss, accuracy = train.nt_xent(tf.constant(z), 0.1, 6)
    assert float(accuracy) == pytest.approx(expected)
    # Uniform similarities: the loss ln(2B - 1) the demo's training passes through.
    loss, _ = train.nt_xent(tf.constant(np.tile(z[:1], (12, 1))), 0.1, 6)
    assert float(loss) == pytest.approx(train.uniform_loss(6), rel=1e-5)


def test_gray_augmentation_keeps_the_mask():
    views_u8 = np.array([[0, 51, 255, 102]], dtype=np.uint8).reshape(1, 1, 1, 1, 4)
    gray = np.array([[[0.8, 0.1, 0.5]]], dtype=np.float32)  # [B=1, views=1, (a, c, u)]
    x = views_u8 / 255.0
    expected = np.where(views_u8 > 0, np.clip(x * 0.8 + 0.1, 0, 1) ** (2 ** 0.5), 0)
    np.testing.assert_allclose(train.apply_gray(tf.constant(views_u8), tf.constant(gray)),
                               expected, rtol=1e-6)


def test_learning_rate_warms_up_then_decays(dataset, pair_table, tmp_path):
    schedule = train.learning_rate_schedule(
        config(dataset, pair_table, tmp_path, steps=110, warmup_steps=10, learning_rate=1e-3))
    lrs = [float(schedule(s)) for s in (0, 5, 10, 60, 110)]
    assert lrs == pytest.approx([0, 5e-4, 1e-3, 5e-4, 0], abs=1e-9)


# ---------------------------------------------------------------- pair tables and views


def test_pair_table_round_trip(tmp_path):
    big = 2**63 + 5  # stored as the int64 with the same bits
    pairs = [(np.array([[1, 2, 3], [4, 5, 6]]), big), (np.array([[7, 8, 9], [7, 8, 10]]), 12)]
    prefix = write_pair_table(str(tmp_path / "t.tfrecord"), pairs, num_shards=2)
    table = views.read_pair_table(prefix)
    assert len(table) == 2 and table.vol_name == "em"
    assert [p.rsplit("/", 1)[1] for p in table.files] == [
        "t.tfrecord-00000-of-00002", "t.tfrecord-00001-of-00002"]
    np.testing.assert_array_equal(table.centers, [pairs[0][0], pairs[1][0]])
    assert list(table.segment_ids) == [big, 12]
    assert views.read_pair_table(str(tmp_path / "t.tfrecord-*")).files == table.files


def test_pair_table_errors_name_the_input(tmp_path):
    with pytest.raises(views.PairTableError, match="no files match"):
        views.read_pair_table(str(tmp_path / "none.tfrecord"))
    path = str(tmp_path / "bad.tfrecord-00000-of-00001")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(records.pair_example(np.zeros((2, 3)), 5, 0, (0, 0), "em", "seg"))
        example = tf.train.Example()
        example.features.feature["center-0"].int64_list.value[:] = [1, 2, 3]
        writer.write(example.SerializeToString())
    with pytest.raises(views.PairTableError, match=f"{path}.*center-1"):
        views.read_pair_table(path)
    other = str(tmp_path / "two.tfrecord-00000-of-00001")
    with tf.io.TFRecordWriter(other) as writer:
        record = tf.train.Example.FromString(records.pair_example(np.zeros((2, 3)), 5, 0, (0, 0),
                                                                "em", "seg"))
        record.features.feature["skeleton_id-1"].int64_list.value[:] = [6]
        writer.write(record.SerializeToString())
    with pytest.raises(views.PairTableError, match="record 0 pairs segments 5 and 6"):
        views.read_pair_table(other)


def open_views(dataset, pair_table, size: int = 17, **kwargs) -> views.PairViews:
    em, segmentation = volume.open_volumes(dataset.em, dataset.segmentation)
    return views.PairViews(views.read_pair_table(pair_table), em, segmentation, size, 8,
                           **kwargs)


def test_views_are_masked_cutouts_and_deterministic(dataset, pair_table, labels):
    source = open_views(dataset, pair_table, seed=4, max_shift=0)
    em = volume.open_volumes(dataset.em, dataset.segmentation)[0].read(source.em.bounds)
    batches = source.window(0)
    assert len(batches) == views.WINDOW_PAIRS // 8 and source.stats.blocks_read == 1
    for batch in batches[:2]:
        for pair, pair_views in zip(batch.pairs, batch.views):
            segment = source.table.segment_ids[pair]
            for center, view in zip(source.table.centers[pair], pair_views):
                box = volume.Box.around(center, 17).intersect(source.segmentation.bounds)
                window = np.where(labels[box.slices()] == segment, em[box.slices()], 0)
                # Flips and axis permutations only move voxels: the same values.
                np.testing.assert_array_equal(np.sort(view, axis=None),
                                              np.sort(np.pad(window.ravel(), (
                                                  0, view.size - window.size))))
    again = open_views(dataset, pair_table, seed=4, max_shift=0)
    resumed = list(again.batches(3, 5, threads=2))
    assert [b.step for b in resumed] == [3, 4]
    for batch, expected in zip(resumed, batches[3:5]):
        np.testing.assert_array_equal(batch.views, expected.views)
        np.testing.assert_array_equal(batch.gray, expected.gray)
    other = open_views(dataset, pair_table, seed=5).window(0)[0]
    assert not np.array_equal(other.pairs, batches[0].pairs)


def test_epochs_cover_every_pair_once(dataset, pair_table):
    source = open_views(dataset, pair_table)
    steps = len(source.table) // 8
    seen = np.concatenate([source.pair_indices(s) for s in range(steps)])
    assert sorted(seen) == list(range(len(source.table)))
    assert not np.array_equal(source.pair_indices(steps), source.pair_indices(0))


def test_centres_outside_the_volumes_are_refused(dataset, tmp_path):
    prefix = write_pair_table(str(tmp_path / "far.tfrecord"),
                              [(np.array([[10, 10, 10], [500, 10, 10]]), 7)], num_shards=1)
    with pytest.raises(views.PairTableError, match=r"center-1 \(500, 10, 10\) of pair 0"):
        open_views(dataset, prefix)


# ---------------------------------------------------------------- training runs


def test_loss_falls_and_the_run_is_recorded(trained, dataset, pair_table):
    cfg, record, losses = trained
    assert len(losses) == 30
    # NT-Xent of batches the run never saw (pairs drawn and augmented with another seed)
    # under the run's initial and trained weights: the same batches, so the batch-to-batch
    # spread of the loss (about +-1.5 at 8 pairs and temperature 0.1) does not hide learning.
    held_out = open_views(dataset, pair_table, seed=99, size=cfg.architecture.input_size
                          ).window(0)[:4]
    trainer = train.Trainer(cfg)
    trainer.initialize()
    initial = np.mean([trainer.gradients(batch)[0] for batch in held_out])
    segclr_model.load_checkpoint([trainer.network, trainer.head],
                                 os.path.join(cfg.out, record["checkpoint"]))
    final = np.mean([trainer.gradients(batch)[0] for batch in held_out])
    assert final < initial - 1.0, (initial, final)
    assert record["steps"] == 30 and record["final_loss"] == pytest.approx(losses[-1])
    assert record["pair_table"]["pairs"] == 256
    out = Path(cfg.out)
    assert (out / "model.ckpt-30.index").exists()
    assert 0 <= record["final_partner_accuracy"] <= 1
    # TensorBoard gets a point per progress line of each scalar.
    tags = collections.Counter(
        value.tag for path in (out / "logs").iterdir()
        for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value)
    assert tags["loss"] == tags["partner_accuracy"] == 6
    assert sorted(p.name for p in (out / "state").iterdir() if p.suffix == ".index") == [
        "ckpt-25.index", "ckpt-30.index"]
    # A rerun of a finished run does nothing and returns the same record.
    assert train.train(cfg) == record


def test_trained_checkpoint_is_a_published_layout(trained, tmp_path):
    cfg, record, _ = trained
    prefix = os.path.join(cfg.out, record["checkpoint"])
    names = set(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
    assert names == set(published_variables(LEARNER)) - {
        n for n in published_variables(LEARNER) if n.rsplit("/", 1)[1] in (
            "moving_stddev", "renorm_mean", "renorm_stddev")}
    network = segclr_model.build_model(LEARNER)
    segclr_model.load_checkpoint(network, prefix)
    identity = segclr_model.export_saved_model(str(tmp_path / "model"), checkpoint=prefix)
    assert identity["architecture"] == LEARNER.to_dict()
    assert identity["weights_sha256"] == segclr_model.weights_sha256(network)
    assert identity["training"]["steps"] == 30
    assert identity["training"]["config"]["pairs"] == cfg.pairs
    with pytest.raises(ValueError, match="was trained with architecture"):
        segclr_model.export_saved_model(str(tmp_path / "other"), Architecture(), prefix)


def test_rerun_with_other_settings_is_refused(trained, tmp_path, dataset, pair_table):
    cfg, _, _ = trained
    with pytest.raises(ValueError, match=r"holds a run with other settings \(batch_size: 8"):
        train.train(config(dataset, pair_table, cfg.out, batch_size=4))
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a training run directory"):
        train.train(config(dataset, pair_table, tmp_path))


def test_configuration_errors_name_the_field(dataset, pair_table, tmp_path):
    for overrides, message in (({"steps": 0}, "steps: must be a positive"),
                               ({"batch_size": 1}, "batch_size: NT-Xent needs"),
                               ({"warmup_steps": 30}, "warmup_steps: 30 must be fewer"),
                               ({"temperature": 0.0}, "temperature: must be positive"),
                               ({"architecture": Architecture(input_size=16)},
                                "architecture.input_size"),
                               ({"pairs": None}, "pairs: required")):
        with pytest.raises(ValueError, match=message):
            config(dataset, pair_table, tmp_path, **overrides)


# The command's runs: TINY on 17^3 views, checkpointed and logged every 4 of 12 steps; what
# they test (the command, its record, resuming) needs no learning.
CLI_STEPS, CLI_EVERY = 12, 4


def run_cli(out: Path, dataset, pair_table, kill_at: str | None = None) -> tuple[str, str]:
    """`segclr-beam train` in a fresh process; killed when a log line contains `kill_at`."""
    flags = ["--pairs", pair_table, "--em", dataset.em, "--segmentation", dataset.segmentation,
             "--out", str(out), "--widths", "4,8,8,16", "--input-size", "17",
             "--bottleneck-width", "16", "--embedding-dim", "8", "--steps", str(CLI_STEPS),
             "--batch-size", "8", "--learning-rate", "3e-3", "--warmup-steps", "2",
             "--checkpoint-every", str(CLI_EVERY), "--log-every", str(CLI_EVERY)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "segclr_beam.cli", "train", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=REPO)
    log = []
    for line in process.stderr:
        log.append(line)
        if kill_at is not None and kill_at in line:
            process.send_signal(signal.SIGKILL)
            break
    stdout = process.stdout.read()
    process.wait()
    log.append(process.stderr.read())
    assert process.returncode == (-signal.SIGKILL if kill_at else 0), "".join(log)
    return stdout, "".join(log)


def test_killed_run_resumes_from_its_checkpoint(tmp_path, dataset, pair_table):
    # An uninterrupted run to compare with, in its own process while the others run.
    uninterrupted = concurrent.futures.ThreadPoolExecutor(1).submit(
        run_cli, tmp_path / "whole", dataset, pair_table)
    out = tmp_path / "out"
    _, log = run_cli(out, dataset, pair_table, kill_at=f"checkpoint at step {CLI_EVERY}")
    assert not (out / segclr_model.TRAINING_RECORD).exists()
    stdout, log = run_cli(out, dataset, pair_table)
    resumed_from = int(log.split("resuming from step ")[1].split()[0])
    assert CLI_EVERY <= resumed_from < CLI_STEPS
    assert f"step {resumed_from + CLI_EVERY - resumed_from % CLI_EVERY}/{CLI_STEPS}" in log
    assert f"step {CLI_EVERY}/{CLI_STEPS}" not in log  # nothing before the checkpoint again
    record = json.loads(stdout)
    assert record["steps"] == CLI_STEPS
    # The same batches on the same state: the last loss of an uninterrupted run in a process
    # like it (the test process's TensorFlow may use another thread count, whose rounding
    # the steps of Adam amplify), up to float rounding.
    whole, _ = uninterrupted.result()
    assert record["final_loss"] == pytest.approx(json.loads(whole)["final_loss"], rel=1e-3)


# ---------------------------------------------------------------- fine-tuning


def trainer_for(tmp_path, init_checkpoint=None) -> train.Trainer:
    return train.Trainer(train.TrainConfig(pairs="p", em="e", segmentation="s", out=str(tmp_path),
                                           architecture=TINY, warmup_steps=0,
                                           init_checkpoint=init_checkpoint))


@pytest.mark.parametrize("layout", ["tf1", "tf2resaved"])
def test_init_checkpoint_loads_the_published_variables(tmp_path, layout):
    values = random_values(published_variables(TINY), seed=2)
    write = write_tf1_checkpoint if layout == "tf1" else write_tf2resaved_checkpoint
    prefix = write(tmp_path / "published", values)
    trainer = trainer_for(tmp_path, prefix)
    trainer.initialize()
    weights = trainer.weights()
    assert any(name.startswith("projection_head_0_0/") for name in weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(value, values[name], err_msg=name)


@pytest.mark.parametrize("layout", ["tf1", "tf2resaved"])
def test_init_checkpoint_missing_a_variable_names_it(tmp_path, layout):
    values = random_values(published_variables(TINY), seed=2)
    del values["projection_head_0_0/nl_1/dense/kernel"]
    write = write_tf1_checkpoint if layout == "tf1" else write_tf2resaved_checkpoint
    trainer = trainer_for(tmp_path, write(tmp_path / "published", values))
    with pytest.raises(CheckpointMismatchError,
                       match=r"1 missing variables:\n    projection_head_0_0/nl_1/dense/kernel"):
        trainer.initialize()


# ---------------------------------------------------------------- several devices

_DEVICES = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from segclr_beam import train
    from segclr_beam.model import Architecture
    from segclr_beam.views import ViewBatch
    rng = np.random.default_rng(0)
    batches = [ViewBatch(step, np.arange(8), rng.integers(0, 256, (8, 2, 17, 17, 17), np.uint8),
                         np.stack([rng.uniform(0.75, 1.25, (8, 2)), rng.uniform(-0.25, 0.25, (8, 2)),
                                   rng.uniform(-1, 1, (8, 2))], -1).astype(np.float32))
               for step in range(3)]
    arch = Architecture(widths=(4, 8, 8, 16), input_size=17, bottleneck_width=16, embedding_dim=8)
    results = {}
    for devices in (["/cpu:0"], ["/cpu:0", "/cpu:1"]):
        config = train.TrainConfig(pairs="p", em="e", segmentation="s", out="o", architecture=arch,
                                   batch_size=8, steps=10, warmup_steps=0)
        trainer = train.Trainer(config, tf.distribute.MirroredStrategy(devices))
        trainer.initialize()
        loss, gradients = trainer.gradients(batches[0])
        # Training steps are compared on two devices only (against the one-device loss).
        steps = [trainer.train_step(b) for b in batches] if len(devices) == 2 else []
        results[len(devices)] = {"loss": loss, "steps": steps,
                                 "gradient": np.concatenate([g.ravel() for g in gradients]).tolist()}
    print(json.dumps(results))
""")


def test_two_devices_give_the_loss_and_gradient_of_one():
    result = subprocess.run([sys.executable, "-c", _DEVICES], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr
    one, two = json.loads(result.stdout.splitlines()[-1]).values()
    # The loss over the global batch: negatives gathered from both devices, batch norm
    # statistics synchronised. float32 sums in another order (measured: 2e-5 relative).
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["steps"][0] == pytest.approx(one["loss"], rel=1e-4)
    # The gradient the optimizer receives is the single-device one: both halves' gradients
    # (through the gathered projections and the shared statistics) summed. Rounding flips a
    # few ReLU and max-pool choices (measured: 3e-4 relative on the stem kernel).
    gradient_one, gradient_two = np.array(one["gradient"]), np.array(two["gradient"])
    assert np.linalg.norm(gradient_two - gradient_one) <= 3e-3 * np.linalg.norm(gradient_one)
    # Later steps train on both devices; Adam's sign-like steps on near-zero gradient
    # components amplify the rounding, so their losses are not compared.
    assert two["steps"][2] != pytest.approx(two["steps"][0], rel=1e-3)


# ---------------------------------------------------------------- cloud storage


def test_everything_on_gcs(gcs, tmp_path, dataset, pair_table):
    em = gcs.upload_dir(Path(dataset.em), "train/em")
    segmentation = gcs.upload_dir(Path(dataset.segmentation), "train/segmentation")
    tables = gcs.upload_dir(Path(pair_table).parent, "train/pairs")
    write_tf1_checkpoint(tmp_path / "init" / "published",
                         random_values(published_variables(TINY), seed=2))
    init_url = gcs.upload_dir(tmp_path / "init", "train/init") + "/published"
    out = f"gs://{gcs.bucket}/train/run"
    cfg = train.TrainConfig(pairs=f"{tables}/pairs.tfrecord", em=em, segmentation=segmentation,
                            out=out, architecture=TINY, steps=4, batch_size=4, warmup_steps=1,
                            checkpoint_every=2, init_checkpoint=init_url)
    record = train.train(cfg)
    assert record["steps"] == 4
    from apache_beam.io.filesystems import FileSystems
    listed = {m.path[len(out) + 1:] for m in FileSystems.match([out + "/**"])[0].metadata_list}
    assert {"config.json", "training.json", "model.ckpt-4.index", "state/checkpoint",
            "state/ckpt-4.index"} <= listed
    assert "state/ckpt-2.index" in listed  # two states kept
    assert train.train(cfg) == record  # finished: read back from gs://
    identity = segclr_model.export_saved_model(f"gs://{gcs.bucket}/train/model",
                                               checkpoint=f"{out}/model.ckpt-4")
    assert identity["training"]["steps"] == 4
