"""Batched SegCLR inference in Beam: (key, uint8 cutout) -> (key, float32 embedding).

A custom ModelHandler runs the exported SavedModel (see segclr_beam.model): batches of a
fixed size (the last one padded, so the graph always sees one shape), uint8 cutouts in and
only embeddings out, so the 2 MB cutouts never travel further than the model. By default
each worker process holds one model, shared by its threads; `share_model_across_processes`
keeps one per machine (e.g. one per GPU) and sends batches to it from the other processes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from segclr_beam.model import SERVING_OUTPUT, copy_tree, model_identity

_BATCHES = beam.metrics.Metrics.counter("segclr", "inference_batches")
_EMBEDDINGS = beam.metrics.Metrics.counter("segclr", "embeddings")


def configure_tensorflow(intra_op_threads: int | None = None,
                         inter_op_threads: int | None = None) -> None:
    """Turn on GPU memory growth and size the thread pools; before TensorFlow's first op.

    Memory growth lets a GPU's memory grow with the batches instead of being taken whole
    at start-up. Threads default to TensorFlow's choice (all cores).
    """
    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        if intra_op_threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads is not None:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError as e:
        raise RuntimeError(
            "TensorFlow ran before the SegCLR model was loaded, so GPU memory growth and "
            f"thread counts can no longer be set in this process: {e}") from e


@contextlib.contextmanager
def local_copy(saved_model_dir: str) -> Iterator[str]:
    """A local path of the SavedModel; remote ones (gs://) are copied to a temporary dir.

    TensorFlow's own gs:// filesystem ignores storage emulators and other Beam
    filesystem settings, so remote models are read through Beam's FileSystems.
    """
    if FileSystems.get_scheme(saved_model_dir) is None:
        yield saved_model_dir
        return
    with tempfile.TemporaryDirectory(prefix="segclr-model-") as tmp:
        copy_tree(saved_model_dir, tmp)
        yield tmp


def check_model(saved_model_dir: str) -> dict:
    """The identity record of an exported model, once its graph and every variable are known
    to be readable (ValueError naming the model otherwise); builds no graph, uses no device."""
    identity = model_identity(saved_model_dir)
    with local_copy(saved_model_dir) as local:
        if not tf.saved_model.contains_saved_model(local):
            raise ValueError(f"{saved_model_dir}: no saved_model.pb")
        try:
            reader = tf.train.load_checkpoint(os.path.join(local, "variables", "variables"))
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
        except (tf.errors.OpError, ValueError) as e:
            reason = str(getattr(e, "message", e)).strip().splitlines()[0]
            raise ValueError(f"{saved_model_dir}: its variables cannot be read: {reason}"
                             ) from None
    return identity


class EmbeddingModel:
    """A loaded SegCLR SavedModel that runs batches of exactly `batch_size` cutouts."""

    def __init__(self, saved_model_dir: str, batch_size: int):
        with local_copy(saved_model_dir) as local:
            self._saved_model = tf.saved_model.load(local)
        self._serve = self._saved_model.signatures["serving_default"]
        self._batch_size = batch_size

    def embed(self, cutouts: np.ndarray) -> np.ndarray:
        """uint8 [n <= batch_size, z, y, x] -> float32 [n, D]; short batches are zero-padded."""
        count = len(cutouts)
        if count < self._batch_size:
            padded = np.zeros((self._batch_size,) + cutouts.shape[1:], dtype=np.uint8)
            padded[:count] = cutouts
            cutouts = padded
        embeddings = self._serve(cutouts=tf.constant(cutouts))[SERVING_OUTPUT]
        return embeddings.numpy()[:count]


class SegclrModelHandler(ModelHandler[np.ndarray, np.ndarray, EmbeddingModel]):
    """Runs an exported SegCLR model on uint8 cutouts [z, y, x]; yields embeddings [D]."""

    def __init__(self, saved_model_dir: str, batch_size: int, *,
                 share_model_across_processes: bool = False, model_copies: int = 1,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None):
        """
        Args:
          saved_model_dir: a model written by `segclr-beam export-model` (local or gs://).
          batch_size: cutouts per model call; every call sees this batch shape.
          share_model_across_processes: one model per machine instead of one per process.
          model_copies: models per machine when shared; more copies run more batches at
            once (TensorFlow places each on its default device).
          intra_op_threads, inter_op_threads: TensorFlow thread pools (default: all cores).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if model_copies < 1:
            raise ValueError(f"model_copies must be positive, got {model_copies}")
        if model_copies > 1 and not share_model_across_processes:
            raise ValueError(f"model_copies={model_copies} needs share_model_across_processes")
        self.identity = model_identity(saved_model_dir)
        super().__init__(
            min_batch_size=batch_size, max_batch_size=batch_size,
            large_model=share_model_across_processes,
            model_copies=model_copies if share_model_across_processes else None)
        self._saved_model_dir = saved_model_dir
        self._batch_size = batch_size
        self._cutout_shape = (self.identity["architecture"]["input_size"],) * 3
        self._threads = (intra_op_threads, inter_op_threads)

    def load_model(self) -> EmbeddingModel:
        configure_tensorflow(*self._threads)
        return EmbeddingModel(self._saved_model_dir, self._batch_size)

    def run_inference(self, batch: Sequence[np.ndarray], model: EmbeddingModel,
                      inference_args: Optional[dict[str, Any]] = None) -> list[np.ndarray]:
        embeddings = []
        for start in range(0, len(batch), self._batch_size):
            chunk = batch[start:start + self._batch_size]
            embeddings.extend(model.embed(self._stack(chunk)))
            _BATCHES.inc()
            _EMBEDDINGS.inc(len(chunk))
        return embeddings

    def _stack(self, cutouts: Sequence[np.ndarray]) -> np.ndarray:
        for i, cutout in enumerate(cutouts):
            if (not isinstance(cutout, np.ndarray) or cutout.dtype != np.uint8
                    or cutout.shape != self._cutout_shape):
                found = (f"{cutout.dtype} {cutout.shape}" if isinstance(cutout, np.ndarray)
                         else type(cutout).__name__)
                raise ValueError(f"cutout {i} of a batch is {found}; the SegCLR model "
                                 f"{self.identity['model_id']} takes uint8 {self._cutout_shape} "
                                 f"(z, y, x)")
        return np.stack(cutouts)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(cutout.nbytes for cutout in batch)

    def get_metrics_namespace(self) -> str:
        return "segclr"


class Embed(beam.PTransform):
    """PCollection[(key, uint8 cutout [z, y, x])] -> PCollection[(key, float32 embedding [D])].

    Place it in the same fused stage as the step that makes the cutouts: only the keyed
    embeddings should cross a shuffle. Options as for SegclrModelHandler.
    """

    def __init__(self, saved_model_dir: str, batch_size: int, **handler_options):
        super().__init__()
        self._handler = SegclrModelHandler(saved_model_dir, batch_size, **handler_options)

    def expand(self, cutouts: beam.PCollection) -> beam.PCollection:
        return cutouts | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
