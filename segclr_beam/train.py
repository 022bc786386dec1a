"""Contrastive training of the SegCLR network on a pair table, from scratch or fine-tuning.

Each step embeds both views of a batch of positive pairs with the network in training mode
(batch statistics), projects the embeddings through the projection head and minimises
NT-Xent: each view must pick its partner among all other views of the global batch. Adam
follows a linear warm-up and a cosine decay. Several GPUs of one machine share the global
batch through MirroredStrategy: projections are gathered across replicas so the negatives
are the whole batch, and batch norm synchronises its statistics across replicas, so a step
computes what it computes on one device.

A run writes into one directory:

    OUT/config.json      the run's configuration; a rerun must match it (it resumes)
    OUT/state/           the training state every --checkpoint-every steps, for resuming
    OUT/logs/            TensorBoard scalars: loss, partner accuracy, learning rate,
                         examples per second
    OUT/model.ckpt-N.*   the trained weights under the published TF1 variable names
    OUT/training.json    the record of the run, written last: it marks a finished run

`model.ckpt-N` is read by `segclr-beam export-model --checkpoint` and `embed --model` like a
published checkpoint; export-model copies training.json into the model's identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems
from tensorflow.core.framework import summary_pb2

from segclr_beam import model as segclr_model
from segclr_beam.cutouts import DEFAULT_BLOCK_SIZE, check_cutout_size
from segclr_beam.model import Architecture, keras
from segclr_beam.views import DEFAULT_MAX_SHIFT, PairViews, ViewBatch, read_pair_table
from segclr_beam.volume import DEFAULT_RESOLUTION, open_volumes

_LOG = logging.getLogger(__name__)

# The TF1 graph's batch-norm momentum (Keras layers default to 0.99).
BN_MOMENTUM = 0.9
# What TensorBoard's scalar plugin reads (tf.summary.scalar without the tensorboard package).
_SCALAR = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
CONFIG_FILE = "config.json"
STATE_DIR = "state"
LOGS_DIR = "logs"
# Fields a resumed run may change: they do not change what is computed.
RESUMABLE_CHANGES = ("checkpoint_every", "log_every", "input_threads")


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; paths may be local or gs://."""

    pairs: str = _field(None, "pair table: a glob of TFRecord files of tf.train.Example, or "
                              "their prefix NAME.tfrecord (files NAME.tfrecord-*-of-*), or a "
                              "directory written by `segclr-beam pairs`")
    em: Any = _field(None, "EM volume the pair table's centres are in (TensorStore spec, "
                           "JSON file or URL)")
    segmentation: Any = _field(None, "segmentation volume the views are masked with")
    out: str = _field(None, "run directory: state, logs, the trained checkpoint")
    resolution: tuple[float, float, float] = _field(
        DEFAULT_RESOLUTION, "X,Y,Z nm of the voxels the pair table's centres are in")
    architecture: Architecture = _field(Architecture(), "network sizes (published by default)")
    projection_dim: int = _field(segclr_model.PROJECTION_DIM, "output width of the "
                                 "projection head")
    steps: int = _field(10000, "training steps of the whole run")
    batch_size: int = _field(32, "pairs per step over all devices (two views each)")
    learning_rate: float = _field(1e-3, "Adam learning rate after warm-up")
    warmup_steps: int = _field(100, "steps of linear warm-up from 0, then cosine decay to 0")
    weight_decay: float = _field(0.0, "decoupled weight decay of Adam")
    temperature: float = _field(0.1, "NT-Xent temperature")
    max_shift: int = _field(DEFAULT_MAX_SHIFT, "largest random shift of a view's centre, "
                                               "voxels per axis")
    block_size: int = _field(DEFAULT_BLOCK_SIZE, "views whose centres share a block of this "
                                                 "edge (voxels) are cut from one read")
    checkpoint_every: int = _field(500, "steps between training-state checkpoints")
    log_every: int = _field(10, "steps between progress lines and TensorBoard scalars")
    seed: int = _field(0, "seed of initial weights, pair order and augmentations")
    init_checkpoint: str | None = _field(None, "start from this checkpoint (TF1 or tf2resaved "
                                               "layout, projection head included): fine-tune")
    input_threads: int = _field(2, "threads cutting and augmenting views")

    def __post_init__(self):
        for name in ("pairs", "em", "segmentation", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        for name in ("projection_dim", "steps", "checkpoint_every", "log_every",
                     "input_threads", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "max_shift", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size: NT-Xent needs at least 2 pairs, got {self.batch_size!r}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be fewer than steps "
                             f"({self.steps})")
        for name in ("learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: must be non-negative, got {self.weight_decay!r}")
        try:
            check_cutout_size(self.architecture.input_size)
        except ValueError as e:
            raise ValueError(f"architecture.input_size: {e}") from None
        object.__setattr__(self, "resolution", tuple(float(v) for v in self.resolution))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "architecture": self.architecture.to_dict(),
                "resolution": list(self.resolution)}


# ----------------------------------------------------------------------------- loss


def nt_xent(projections: tf.Tensor, temperature: float,
            global_batch: int) -> tuple[tf.Tensor, tf.Tensor]:
    """NT-Xent and partner accuracy of this replica's views, each scaled so that the
    replicas' sum is the batch mean.

    `projections` [2b, d] holds the replica's first views, then its second views. Every view
    is scored against all 2 * `global_batch` views of all replicas (gathered), its own
    excluded; the target is its partner. The partner accuracy is the fraction of views whose
    most similar other view is their partner (chance: 1 / (2 * global_batch - 1)); it tells
    learning apart from a loss that only falls to that of uniform similarities.
    """
    z = tf.math.l2_normalize(projections, axis=1)
    b = tf.shape(z)[0] // 2
    context = tf.distribute.get_replica_context()
    first = context.all_gather(z[:b], axis=0)
    second = context.all_gather(z[b:], axis=0)
    everyone = tf.concat([first, second], axis=0)  # [2B, d]
    logits = tf.matmul(z, everyone, transpose_b=True) / temperature
    rows = context.replica_id_in_sync_group * b + tf.range(b)
    own = tf.concat([rows, rows + global_batch], axis=0)
    partner = tf.concat([rows + global_batch, rows], axis=0)
    logits -= 1e9 * tf.one_hot(own, 2 * global_batch)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(partner, logits)
    found = tf.cast(tf.argmax(logits, axis=1, output_type=partner.dtype) == partner, tf.float32)
    scale = tf.cast(2 * global_batch, tf.float32)
    return tf.reduce_sum(losses) / scale, tf.reduce_sum(found) / scale


def uniform_loss(batch_size: int) -> float:
    """NT-Xent when every view is equally similar to all others: ln(2 * batch_size - 1)."""
    return float(np.log(2 * batch_size - 1))


def apply_gray(views: tf.Tensor, gray: tf.Tensor) -> tf.Tensor:
    """The gray-value augmentation of uint8 views [..., s, s, s] with parameters [..., 3].

    x * a + c, clipped to [0, 1], to the power 2^u; voxels outside the mask stay zero.
    """
    x = tf.cast(views, tf.float32) / 255.0
    a, c, u = (gray[..., i, tf.newaxis, tf.newaxis, tf.newaxis] for i in range(3))
    y = tf.pow(tf.clip_by_value(x * a + c, 0.0, 1.0), tf.pow(2.0, u))
    return tf.where(views > 0, y, 0.0)


# ----------------------------------------------------------------------------- network


def space_to_depth_conv(x: tf.Tensor, kernel: tf.Tensor, stride: int) -> tf.Tensor:
    """conv3d(x, kernel, stride, SAME) as a stride-1 convolution of x's stride^3 blocks.

    Padding x as SAME does (plus the end to a multiple of the stride) and folding each
    stride^3 block of voxels into channels turns the strided convolution into an unstrided
    one with a kernel of ceil(k / stride) taps, the kernel zero-padded and folded alike. Same
    values (up to summation order); TensorFlow's CPU gradients of strided 3-D convolutions
    are very slow (150x for the 7^3 stem at 33^3, 15x for a 3^3 block), the unstrided fast.
    """
    k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    taps = -(-k // stride)
    pads, blocks = [[0, 0]], []
    for size in x.shape[1:4]:
        out = -(-size // stride)
        before = max((out - 1) * stride + k - size, 0) // 2
        padded = stride * (out + taps - 1)
        pads.append([before, padded - size - before])
        blocks.append(padded // stride)
    x = tf.pad(x, pads + [[0, 0]])
    z, y, w = blocks
    x = tf.reshape(x, (-1, z, stride, y, stride, w, stride, cin))
    x = tf.reshape(tf.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7)), (-1, z, y, w, stride**3 * cin))
    kernel = tf.pad(kernel, [[0, taps * stride - k]] * 3 + [[0, 0], [0, 0]])
    kernel = tf.reshape(kernel, (taps, stride, taps, stride, taps, stride, cin, cout))
    kernel = tf.reshape(tf.transpose(kernel, (0, 2, 4, 1, 3, 5, 6, 7)),
                        (taps, taps, taps, stride**3 * cin, cout))
    return tf.nn.conv3d(x, kernel, [1] * 5, "VALID")


class SpaceToDepthConv3D(keras.layers.Conv3D):
    """A strided SAME Conv3D computed by space_to_depth_conv; same weights, same values."""

    def convolution_op(self, inputs, kernel):
        return space_to_depth_conv(inputs, kernel, self.strides[0])


def training_network(arch: Architecture) -> keras.Model:
    """The embedding network whose strided convolutions (the stem and the first of each
    downsampling block) are SpaceToDepthConv3D: same layers, weights and values."""
    network = segclr_model.build_model(arch)

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        strided = (isinstance(layer, keras.layers.Conv3D) and max(layer.strides) > 1
                   and max(layer.kernel_size) > 1)
        return (SpaceToDepthConv3D if strided else type(layer)).from_config(layer.get_config())

    return keras.models.clone_model(network, clone_function=clone)


# ----------------------------------------------------------------------------- trainer


def learning_rate_schedule(config: TrainConfig) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to the learning rate, then cosine decay to 0 at the last step."""
    warmup = config.warmup_steps
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else config.learning_rate, config.steps - warmup,
        warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup)


class Trainer:
    """The network, its projection head, the optimizer and the distributed training step."""

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy | None = None):
        self.config = config
        self.strategy = strategy or tf.distribute.MirroredStrategy()
        replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise ValueError(f"batch_size: {config.batch_size} pairs do not split evenly over "
                             f"{replicas} devices")
        arch = config.architecture
        with self.strategy.scope():
            self.network = training_network(arch)
            self.head = segclr_model.build_projection_head(arch, config.projection_dim)
            self.schedule = learning_rate_schedule(config)
            self.optimizer = keras.optimizers.Adam(
                self.schedule, weight_decay=config.weight_decay or None)
            self.variables = self.network.trainable_variables + self.head.trainable_variables
            self.optimizer.build(self.variables)
            self.last_loss = tf.Variable(np.nan, dtype=tf.float32, trainable=False)
            self.last_accuracy = tf.Variable(np.nan, dtype=tf.float32, trainable=False)
        for layer in self.network.layers + self.head.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = BN_MOMENTUM
                layer.synchronized = replicas > 1  # statistics of the global batch
        self.checkpoint = tf.train.Checkpoint(network=self.network, head=self.head,
                                              optimizer=self.optimizer, last_loss=self.last_loss,
                                              last_accuracy=self.last_accuracy)

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def initialize(self) -> None:
        """Weights from `init_checkpoint` (strictly, head included), else seeded random."""
        if self.config.init_checkpoint:
            segclr_model.load_checkpoint([self.network, self.head], self.config.init_checkpoint)
        else:
            segclr_model.random_init(self.network, self.config.seed)
            segclr_model.random_init(self.head, self.config.seed + 1)

    def _replica_gradients(self, views: tf.Tensor, gray: tf.Tensor):
        x = apply_gray(views, gray)  # [b, 2, s, s, s]
        x = tf.concat([x[:, 0], x[:, 1]], axis=0)[..., tf.newaxis]
        with tf.GradientTape() as tape:
            projections = self.head(self.network(x, training=True), training=True)
            loss, accuracy = nt_xent(projections, self.config.temperature,
                                     self.config.batch_size)
        return loss, accuracy, tape.gradient(loss, self.variables)

    def _replica_step(self, views: tf.Tensor, gray: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        loss, accuracy, gradients = self._replica_gradients(views, gray)
        self.optimizer.apply_gradients(zip(gradients, self.variables))  # summed over replicas
        return loss, accuracy

    @tf.function
    def _step(self, views, gray) -> tf.Tensor:
        results = self.strategy.run(self._replica_step, args=(views, gray))
        loss, accuracy = (self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                          for v in results)
        self.last_loss.assign(loss)
        self.last_accuracy.assign(accuracy)
        return loss

    @tf.function
    def _gradients(self, views, gray):
        results = self.strategy.run(self._replica_gradients, args=(views, gray))
        return tf.nest.map_structure(
            lambda v: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), results)

    def _distribute(self, batch: ViewBatch) -> tuple:
        """The batch's views and gray-value parameters split over the devices."""
        per_replica = self.config.batch_size // self.strategy.num_replicas_in_sync

        def rows(array: np.ndarray, context: tf.distribute.ValueContext) -> tf.Tensor:
            first = context.replica_id_in_sync_group * per_replica
            return tf.constant(array[first:first + per_replica])

        return tuple(self.strategy.experimental_distribute_values_from_function(
            lambda context, array=array: rows(array, context)) for array in (batch.views, batch.gray))

    def train_step(self, batch: ViewBatch) -> float:
        """One optimisation step on a batch (split over the devices); its NT-Xent loss (its
        partner accuracy is then `last_accuracy`)."""
        return float(self._step(*self._distribute(batch)))

    def gradients(self, batch: ViewBatch) -> tuple[float, list[np.ndarray]]:
        """The loss of a batch and its gradient as the optimizer receives it, without a step."""
        loss, _, gradients = self._gradients(*self._distribute(batch))
        return float(loss), [g.numpy() for g in gradients]

    def weights(self) -> dict[str, np.ndarray]:
        """Network and projection-head weights under their published TF1 names."""
        weights = {**segclr_model.checkpoint_weights(self.network),
                   **segclr_model.checkpoint_weights(self.head)}
        return {name: np.asarray(w.numpy()) for name, w in weights.items()}

    def export(self, prefix: str) -> None:
        """Write the weights as a TF1 name-based checkpoint (a published layout)."""
        weights = self.weights()
        names = sorted(weights)
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                          tensors=[tf.constant(weights[n]) for n in names])


# ----------------------------------------------------------------------------- run directory


class _Mirror:
    """Keeps a remote run directory a copy of the local one it is worked in.

    Changed files go up, files gone locally are deleted; the file naming the latest state
    and the training record go last, so the remote never names what is not there yet.
    """

    _LAST = (f"{STATE_DIR}/checkpoint", segclr_model.TRAINING_RECORD)

    def __init__(self, local: str, remote: str):
        self.local, self.remote = local, remote.rstrip("/")
        self._sent: dict[str, tuple[int, int]] = {}

    def pull(self) -> None:
        if FileSystems.match([self.remote + "/**"])[0].metadata_list:
            segclr_model.copy_tree(self.remote, self.local)
        self._sent = self._listing()

    def _listing(self) -> dict[str, tuple[int, int]]:
        found = {}
        for root, _, files in os.walk(self.local):
            for name in files:
                path = os.path.join(root, name)
                stat = os.stat(path)
                found[os.path.relpath(path, self.local)] = (stat.st_size, stat.st_mtime_ns)
        return found

    def push(self) -> None:
        listing = self._listing()
        changed = sorted((p for p, s in listing.items() if self._sent.get(p) != s),
                         key=lambda p: (p in self._LAST, p))
        for path in changed:
            with open(os.path.join(self.local, path), "rb") as fin, \
                    FileSystems.create(f"{self.remote}/{path}") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
        gone = [f"{self.remote}/{p}" for p in self._sent if p not in listing]
        if gone:
            FileSystems.delete(gone)
        self._sent = listing


@contextlib.contextmanager
def _run_directory(out: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """A local directory to work in and a function that publishes it to `out`."""
    if FileSystems.get_scheme(out) is None:
        os.makedirs(out, exist_ok=True)
        yield out, lambda: None
        return
    with tempfile.TemporaryDirectory(prefix="segclr-train-") as tmp:
        mirror = _Mirror(tmp, out)
        mirror.pull()
        yield tmp, mirror.push


def _check_previous(work: str, config: TrainConfig) -> None:
    """Refuse a run directory holding anything but an earlier part of this same run."""
    path = os.path.join(work, CONFIG_FILE)
    if not os.path.exists(path):
        if os.listdir(work):
            raise FileExistsError(f"out: {config.out} holds files but no {CONFIG_FILE}; it is "
                                  "not a training run directory: choose a new one")
        return
    with open(path) as f:
        previous = json.load(f)
    current = config.to_dict()
    differ = sorted(k for k in set(previous) | set(current)
                    if k not in RESUMABLE_CHANGES and previous.get(k) != current.get(k))
    if differ:
        raise ValueError(f"out: {config.out} holds a run with other settings ("
                         + ", ".join(f"{k}: {previous.get(k)!r} there, {current.get(k)!r} now"
                                     for k in differ) + "); resume it with its settings or "
                         "choose a new directory")


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None,
          on_step: Callable[[int, float], None] | None = None) -> dict:
    """Run (or resume, or finish) the training of `config`; the training record it wrote.

    Everything is checked before the first step: the pair table, the volumes and that the
    table's centres lie in them, the initial checkpoint, the run directory. A directory
    holding a killed run of the same configuration resumes from its last state; a finished
    one is returned as it is. `on_step(step, loss)` is called after every step.
    """
    table = read_pair_table(config.pairs)
    em, segmentation = open_volumes(config.em, config.segmentation, config.resolution)
    views = PairViews(table, em, segmentation, config.architecture.input_size,
                      config.batch_size, config.seed, config.max_shift, config.block_size)
    with _run_directory(config.out) as (work, publish):
        _check_previous(work, config)
        record_path = os.path.join(work, segclr_model.TRAINING_RECORD)
        if os.path.exists(record_path):
            with open(record_path) as f:
                return json.load(f)
        trainer = Trainer(config, strategy)
        manager = tf.train.CheckpointManager(trainer.checkpoint, os.path.join(work, STATE_DIR),
                                             max_to_keep=2)
        if manager.latest_checkpoint:
            trainer.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            _LOG.info("resuming from step %d (%s)", trainer.step, manager.latest_checkpoint)
        else:
            trainer.initialize()
            with open(os.path.join(work, CONFIG_FILE), "w") as f:
                json.dump(config.to_dict(), f, indent=2, sort_keys=True)
            publish()
        _LOG.info("training %d steps of %d pairs on %d device(s), %d pairs in %s", config.steps,
                  config.batch_size, trainer.strategy.num_replicas_in_sync, len(table),
                  config.pairs)
        _run_steps(trainer, views, manager, work, publish, on_step)
        stats = views.stats
        _LOG.info("%d views cut from %d block and %d window reads (%.0f MB decoded)",
                  stats.cutouts, stats.blocks_read, stats.windows_read, stats.bytes_decoded / 1e6)
        prefix = os.path.join(work, f"model.ckpt-{trainer.step}")
        trainer.export(prefix)
        record = {
            "checkpoint": os.path.basename(prefix),
            "steps": trainer.step,
            "final_loss": float(trainer.last_loss.numpy()),
            "final_partner_accuracy": float(trainer.last_accuracy.numpy()),
            "architecture": config.architecture.to_dict(),
            "projection_dim": config.projection_dim,
            "pair_table": table.describe(),
            "config": config.to_dict(),
        }
        with open(record_path, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        publish()
    return record


def _run_steps(trainer: Trainer, views: PairViews, manager: tf.train.CheckpointManager,
               work: str, publish: Callable[[], None],
               on_step: Callable[[int, float], None] | None) -> None:
    """The steps from the trainer's step to the last one, with progress and checkpoints.

    Progress lines and TensorBoard get the loss and partner accuracy averaged over the steps
    since the last line, beside their values for uniform similarities."""
    config = trainer.config
    writer = tf.summary.create_file_writer(os.path.join(work, LOGS_DIR))
    uniform, chance = uniform_loss(config.batch_size), 1 / (2 * config.batch_size - 1)
    since, waited, count, losses, accuracies = time.perf_counter(), 0.0, 0, [], []
    batches = views.batches(trainer.step, config.steps, config.input_threads)
    while True:
        before = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - before
        if batch is None:
            break
        loss = trainer.train_step(batch)
        losses.append(loss)
        accuracies.append(float(trainer.last_accuracy.numpy()))
        _LOG.debug("step %d %.3f s", batch.step, time.perf_counter() - before)
        step, count = batch.step + 1, count + 1
        if on_step is not None:
            on_step(step, loss)
        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - since
            rate = count * config.batch_size / elapsed
            learning_rate = float(trainer.schedule(step))
            loss, accuracy = float(np.mean(losses)), float(np.mean(accuracies))
            _LOG.info("step %d/%d loss %.3f (uniform %.3f) partner accuracy %.3f (chance %.3f)"
                      " lr %.2e %.1f examples/s input wait %.0f%%", step, config.steps, loss,
                      uniform, accuracy, chance, learning_rate, rate, 100 * waited / elapsed)
            with writer.as_default(step=step):
                for tag, value in (("loss", loss), ("partner_accuracy", accuracy),
                                   ("learning_rate", learning_rate),
                                   ("examples_per_second", rate)):
                    tf.summary.write(tag, tf.constant(value, tf.float32), metadata=_SCALAR)
            since, waited, count, losses, accuracies = time.perf_counter(), 0.0, 0, [], []
        if step % config.checkpoint_every == 0 or step == config.steps:
            writer.flush()
            manager.save(checkpoint_number=step)
            publish()
            _LOG.info("checkpoint at step %d", step)
