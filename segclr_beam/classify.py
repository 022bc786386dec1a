"""Classifiers on embeddings: a residual MLP (0 blocks = linear) with an optional SNGP head.

SNGP (spectral-normalised hidden layers and a random-feature Gaussian-process output layer)
makes the classifier aware of distance to its training data: the GP's posterior variance
grows away from it, the variance-adjusted ("mean-field") logits shrink there, and the
Dempster-Shafer score K / (K + sum exp(logits)) rises. Embeddings are standardised per
dimension with statistics saved beside the weights; classes are balanced by weights; the
validation split is by segment; training stops early and keeps the best weights. A saved
classifier is a directory: `classifier.json` (classes, input variant and radius, embedding
model, standardisation, metrics, configuration) and `classifier.weights.h5`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from scipy.special import expit

from segclr_beam.config import ConfigError, _field
from segclr_beam.shards import join, read_json, write_file

FORMAT = "segclr-beam classifier"
FORMAT_VERSION = 1
META_NAME = "classifier.json"
WEIGHTS_NAME = "classifier.weights.h5"
MEAN_FIELD_FACTOR = math.pi / 8  # lambda in logits / sqrt(1 + lambda * variance)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The architecture and training of one classifier; defaults are SegCLR's BERT_SNGP_v1."""

    hidden: int = _field(128, "width of the hidden layers", int)
    blocks: int = _field(2, "residual blocks; 0 makes the classifier linear", int)
    sngp: bool = _field(False, "spectral-normalised hidden layers and a random-feature "
                        "Gaussian-process output layer", None)
    spectral_bound: float = _field(0.95, "upper bound of each hidden layer's spectral norm",
                                   float)
    random_features: int = _field(2048, "random Fourier features of the GP output layer", int)
    gp_lengthscale: float = _field(2.0, "RBF kernel lengthscale of the GP, in units of the "
                                   "hidden layer", float)
    ridge: float = _field(1e-3, "ridge penalty of the GP posterior precision", float)
    l2: float = _field(1e-3, "L2 penalty of the kernels", float)
    batch_size: int = _field(128, "training batch", int)
    learning_rate: float = _field(1e-3, "Adam learning rate", float)
    patience: int = _field(20, "epochs without a better validation loss before stopping", int)
    max_epochs: int = _field(500, "upper bound on training epochs", int)
    validation_fraction: float = _field(0.2, "fraction of segments held out for validation",
                                        float)
    seed: int = _field(0, "seed of initialisation, shuffling and the validation split", int)

    def validate(self) -> "ClassifierConfig":
        for name in ("hidden", "random_features", "batch_size", "patience", "max_epochs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.blocks < 0:
            raise ConfigError(f"blocks: must be >= 0, got {self.blocks}")
        for name in ("spectral_bound", "gp_lengthscale", "ridge", "learning_rate"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.l2 < 0:
            raise ConfigError(f"l2: must be >= 0, got {self.l2}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction: must be in (0, 1), "
                              f"got {self.validation_fraction}")
        return self


# Keras layers --------------------------------------------------------------------------------

def _keras():
    import keras  # imported on use: the Beam job's graph construction does not need it

    return keras


def spectral_dense(units: int, bound: float, l2: float, seed: int, name: str):
    """A dense layer whose kernel is rescaled to a spectral norm of at most `bound`."""
    keras = _keras()
    ops = keras.ops

    class SpectralDense(keras.layers.Layer):
        """W * min(1, bound / sigma), sigma estimated by one power iteration per training
        step (`u` carries the estimate between steps); inference reuses the last `u`."""

        def build(self, input_shape):
            self.kernel = self.add_weight(
                name="kernel", shape=(input_shape[-1], units),
                initializer=keras.initializers.GlorotUniform(seed),
                regularizer=keras.regularizers.L2(l2) if l2 else None)
            self.bias = self.add_weight(name="bias", shape=(units,), initializer="zeros")
            self.u = self.add_weight(name="u", shape=(1, units), trainable=False,
                                     initializer=keras.initializers.RandomNormal(seed=seed + 1))

        def normalized_kernel(self, training=False):
            w = self.kernel
            v = _unit(ops.matmul(self.u, ops.transpose(w)))
            u = _unit(ops.matmul(v, w))
            v, u = ops.stop_gradient(v), ops.stop_gradient(u)
            sigma = ops.sum(ops.matmul(v, w) * u)
            if training:
                self.u.assign(u)
            return w * ops.minimum(1.0, bound / sigma)

        def call(self, x, training=False):
            return ops.matmul(x, self.normalized_kernel(training)) + self.bias

    def _unit(x):
        return x / (ops.sqrt(ops.sum(x * x)) + 1e-12)

    return SpectralDense(name=name)


def random_feature_gp(classes: int, features: int, lengthscale: float, l2: float, seed: int,
                      name: str = "gp"):
    """The GP output layer: logits = phi(h) beta + b, phi = sqrt(2/M) cos(h W / l + c).

    W ~ N(0, 1) and c ~ U(0, 2 pi) are fixed (random Fourier features of an RBF kernel); the
    posterior covariance of beta, ridge * inverse(ridge I + sum phi phi^T) (a Laplace
    approximation with a Gaussian likelihood), is a non-trainable weight set by
    `fit_posterior` once training is done; it starts at the prior, the identity.
    """
    keras = _keras()
    ops = keras.ops

    class RandomFeatureGP(keras.layers.Layer):
        def build(self, input_shape):
            rng = np.random.default_rng(seed)
            dim = input_shape[-1]
            self.projection = self.add_weight(
                name="projection", shape=(dim, features), trainable=False,
                initializer=keras.initializers.Constant(
                    rng.standard_normal((dim, features)) / lengthscale))
            self.phase = self.add_weight(
                name="phase", shape=(features,), trainable=False,
                initializer=keras.initializers.Constant(rng.uniform(0, 2 * np.pi, features)))
            self.beta = self.add_weight(
                name="beta", shape=(features, classes),
                initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
                regularizer=keras.regularizers.L2(l2) if l2 else None)
            self.bias = self.add_weight(name="bias", shape=(classes,), initializer="zeros")
            self.covariance = self.add_weight(name="covariance", shape=(features, features),
                                              trainable=False, initializer="identity")

        def features(self, h):
            return math.sqrt(2.0 / features) * ops.cos(ops.matmul(h, self.projection)
                                                       + self.phase)

        def call(self, h):
            phi = self.features(h)
            return ops.matmul(phi, self.beta) + self.bias, phi

    return RandomFeatureGP(name=name)


def build_model(dim: int, classes: int, config: ClassifierConfig):
    """embeddings [B, dim] (standardised) -> (logits [B, K], features [B, M]): the GP's
    random features with SNGP (the posterior variance is `phi Sigma phi^T`, see
    `Classifier.outputs`), the logits' input without."""
    keras = _keras()
    layers = keras.layers
    c, seed = config, config.seed

    def dense(units, name, k):
        if c.sngp:
            return spectral_dense(units, c.spectral_bound, c.l2, seed + 10 * k, name)
        return layers.Dense(units, name=name,
                            kernel_initializer=keras.initializers.GlorotUniform(seed + 10 * k),
                            kernel_regularizer=keras.regularizers.L2(c.l2) if c.l2 else None)

    inputs = keras.Input((dim,), name="embeddings")
    h = inputs
    if c.blocks:
        h = dense(c.hidden, "input", 0)(h)
        for k in range(1, c.blocks + 1):  # pre-activation residual blocks
            h = layers.Add(name=f"block{k}")([h, dense(c.hidden, f"block{k}_dense", k)(
                layers.ReLU(name=f"block{k}_relu")(h))])
        h = layers.ReLU(name="output_relu")(h)
    if c.sngp:
        logits, features = random_feature_gp(classes, c.random_features, c.gp_lengthscale,
                                             c.l2, seed + 1000)(h)
    else:
        logits = layers.Dense(classes, name="logits",
                              kernel_initializer=keras.initializers.GlorotUniform(seed + 1000),
                              kernel_regularizer=keras.regularizers.L2(c.l2) if c.l2 else None)(h)
        features = h
    return keras.Model(inputs, [logits, features], name="classifier")


def _gp_layer(model):
    """The GP output layer of an SNGP model, None without one."""
    return next((layer for layer in model.layers if hasattr(layer, "covariance")), None)


# Uncertainty ---------------------------------------------------------------------------------

def mean_field_logits(logits: np.ndarray, variance: np.ndarray,
                      factor: float = MEAN_FIELD_FACTOR) -> np.ndarray:
    """logits / sqrt(1 + factor * variance): the mean-field approximation of the GP's
    predictive softmax."""
    return np.asarray(logits, np.float64) / np.sqrt(1.0 + factor * np.asarray(variance,
                                                                              np.float64))[:, None]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def dempster_shafer(logits: np.ndarray) -> np.ndarray:
    """K / (K + sum_k exp(logit_k)), in [0, 1]: high where no class has evidence."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1)
    log_sum = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return expit(np.log(z.shape[1]) - log_sum)


# Training ------------------------------------------------------------------------------------

def held_out(labels: np.ndarray, segment_ids: np.ndarray, fraction: float,
             seed: int) -> np.ndarray:
    """A boolean mask of about `fraction` of the segments, whole: the test nodes of the first
    fold of evaluate.segment_folds (stratified by class)."""
    from segclr_beam.evaluate import segment_folds

    segments = len(np.unique(segment_ids))
    folds = min(segments, max(2, round(1 / fraction)))
    _, test = segment_folds(np.asarray(labels, dtype=str), segment_ids, folds, seed)[0]
    mask = np.zeros(len(segment_ids), bool)
    mask[test] = True
    return mask


def class_weights(y: np.ndarray, classes: int) -> np.ndarray:
    """n / (K * count_k) per class, so every class weighs the same in the loss."""
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (classes * np.maximum(counts, 1)), 0.0)


@dataclasses.dataclass
class Classifier:
    """A trained classifier with what it needs to be applied and checked."""

    config: ClassifierConfig
    classes: tuple[str, ...]
    mean: np.ndarray  # float64 [D]
    std: np.ndarray   # float64 [D]
    input: dict       # variant, aggregation_radius_nm and model of the trees it was trained on
    metrics: dict
    model: Any        # the Keras model
    _forward: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _covariance: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def outputs(self, embeddings: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray,
                                                                              np.ndarray]:
        """Raw (logits float32 [N, K], GP posterior variance float32 [N], 0 without SNGP),
        in batches of `batch_size` rows.

        The network runs as one compiled function per batch; the variance, a product with
        the M x M covariance per row (most of SNGP's arithmetic), is a float32 matrix
        product by numpy's BLAS, which is faster at it than TensorFlow's CPU kernels."""
        x = ((np.asarray(embeddings, np.float64) - self.mean) / self.std).astype(np.float32)
        forward, covariance = self._compiled()
        logits = np.empty((len(x), len(self.classes)), np.float32)
        variance = np.zeros(len(x), np.float32)
        for a in range(0, len(x), batch_size):
            out = forward(x[a:a + batch_size])
            logits[a:a + batch_size] = out[0].numpy()
            if covariance is not None:
                phi = out[1].numpy()
                variance[a:a + batch_size] = np.einsum("ij,ij->i", phi @ covariance, phi)
        return logits, variance

    def _compiled(self):
        """(the model as a compiled function of a batch, the GP covariance or None), made
        on first use."""
        if self._forward is None:
            import tensorflow as tf

            spec = tf.TensorSpec([None, len(self.mean)], tf.float32)
            self._forward = tf.function(lambda x: self.model(x, training=False),
                                        input_signature=[spec])
            gp = _gp_layer(self.model)
            self._covariance = None if gp is None else \
                _keras().ops.convert_to_numpy(gp.covariance)
        return self._forward, self._covariance

    def predict(self, embeddings: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray,
                                                                               np.ndarray]:
        """(probabilities [N, K], Dempster-Shafer uncertainty [N]), both from the
        variance-adjusted logits (plain logits without SNGP), float64."""
        logits, variance = self.outputs(embeddings, batch_size)
        adjusted = mean_field_logits(logits, variance)
        return softmax(adjusted), dempster_shafer(adjusted)

    def save(self, path: str) -> str:
        """Write the classifier directory (local or gs://); `path` must not hold one."""
        if FileSystems.exists(join(path, META_NAME)):
            raise FileExistsError(f"{path} already holds a classifier ({META_NAME})")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "classes": list(self.classes), "input": self.input,
                "embedding_dim": int(len(self.mean)),
                "standardization": {"mean": self.mean.tolist(), "std": self.std.tolist()},
                "config": dataclasses.asdict(self.config), "metrics": self.metrics,
                "mean_field_factor": MEAN_FIELD_FACTOR}
        with tempfile.TemporaryDirectory() as local:
            weights = os.path.join(local, WEIGHTS_NAME)
            self.model.save_weights(weights)
            with open(weights, "rb") as f:
                write_file(join(path, WEIGHTS_NAME), f.read())
        # The description last: a directory with it is complete.
        write_file(join(path, META_NAME), (json.dumps(meta, indent=2, sort_keys=True)
                                           + "\n").encode(), "application/json")
        return path


def read_meta(path: str) -> dict:
    """A classifier directory's classifier.json; errors name the path."""
    meta_path = join(path, META_NAME)
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a classifier directory (cannot read {meta_path}: "
                         f"{e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a {FORMAT} description")
    return meta


def load(path: str) -> Classifier:
    """The classifier saved at `path` (local or gs://)."""
    meta = read_meta(path)
    config = ClassifierConfig(**meta["config"])
    classes = tuple(meta["classes"])
    model = build_model(meta["embedding_dim"], len(classes), config)
    with tempfile.TemporaryDirectory() as local:
        weights = os.path.join(local, WEIGHTS_NAME)
        with FileSystems.open(join(path, WEIGHTS_NAME)) as src, open(weights, "wb") as dst:
            shutil.copyfileobj(src, dst)
        model.load_weights(weights)
    standard = meta["standardization"]
    return Classifier(config, classes, np.asarray(standard["mean"]), np.asarray(standard["std"]),
                      meta["input"], meta["metrics"], model)


def _exact_spectral_norms(model) -> None:
    """Set each spectral-normalised layer's power-iteration vector to its kernel's top right
    singular vector, so that inference bounds the kernel by its actual spectral norm."""
    for layer in model.layers:
        if hasattr(layer, "normalized_kernel"):
            kernel = _keras().ops.convert_to_numpy(layer.kernel).astype(np.float64)
            layer.u.assign(np.linalg.svd(kernel)[2][:1].astype(np.float32))


def _fit(model, train_set: tuple, validation_set: tuple, config: ClassifierConfig,
         verbose: int = 0) -> list[float]:
    """Adam on the class-weighted cross-entropy of the logits plus the L2 penalties, in
    shuffled batches, until the validation loss has not improved for `patience` epochs; the
    weights of the best epoch are kept. Returns the validation loss of every epoch.

    Each epoch is one call of a compiled loop over its batches, and each validation one
    more: Keras' `fit` costs a good part of a second per epoch in its own machinery, more
    than these small networks' arithmetic."""
    import tensorflow as tf

    keras = _keras()
    variables = model.trainable_variables
    optimizer = keras.optimizers.Adam(config.learning_rate)
    optimizer.build(variables)

    def loss_of(x, y, w, training):
        logits = model(x, training=training)[0]
        ce = keras.ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return keras.ops.mean(ce * w) + sum(model.losses)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def epoch(order):
        for a in tf.range(0, tf.size(order, tf.int64), config.batch_size):
            batch = order[a:a + config.batch_size]
            with tf.GradientTape() as tape:
                loss = loss_of(tf.gather(x, batch), tf.gather(y, batch), tf.gather(w, batch),
                               True)
            optimizer.apply(tape.gradient(loss, variables), variables)

    validate = tf.function(lambda x, y, w: loss_of(x, y, w, False))
    def constants(x, y, w):
        return tf.constant(x, tf.float32), tf.constant(y), tf.constant(w, tf.float32)

    x, y, w = constants(*train_set)
    validation = constants(*validation_set)
    rng = np.random.default_rng(config.seed)
    losses, best = [], None
    for k in range(config.max_epochs):
        epoch(tf.constant(rng.permutation(len(train_set[0]))))
        losses.append(float(validate(*validation)))
        if verbose:
            print(f"epoch {k + 1}: validation loss {losses[-1]:.4f}", flush=True)
        if best is None or losses[-1] < losses[best]:
            best, weights = k, model.get_weights()
        elif k - best >= config.patience:
            break
    model.set_weights(weights)
    return losses


def fit_posterior(model, x: np.ndarray, ridge: float, batch_size: int = 1024) -> None:
    """Set the GP layer's covariance from the (standardised) training inputs, in float64;
    a no-op without a GP layer."""
    gp = _gp_layer(model)
    if gp is None:
        return
    precision = ridge * np.eye(gp.covariance.shape[0])
    for a in range(0, len(x), batch_size):
        phi = _keras().ops.convert_to_numpy(model(x[a:a + batch_size], training=False)[1])
        phi = phi.astype(np.float64)
        precision += phi.T @ phi
    gp.covariance.assign((ridge * np.linalg.inv(precision)).astype(np.float32))


def train(embeddings: np.ndarray, labels: Sequence[str], segment_ids: np.ndarray,
          config: ClassifierConfig = ClassifierConfig(), *, classes: Sequence[str] | None = None,
          input: dict | None = None, verbose: int = 0) -> Classifier:
    """Train on labelled nodes: embeddings [N, D], one class name per node, its segment id."""
    keras = _keras()
    config.validate()
    x = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels, dtype=object)
    if x.ndim != 2 or len(x) != len(labels) or len(x) != len(segment_ids):
        raise ValueError(f"embeddings {x.shape}, {len(labels)} labels and {len(segment_ids)} "
                         f"segment ids do not describe the same nodes")
    if not np.isfinite(x).all():
        raise ValueError("embeddings hold NaN or infinite values")
    classes = tuple(sorted(set(labels.tolist()))) if classes is None else tuple(classes)
    unknown = sorted(set(labels.tolist()) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(classes)}")
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {list(classes)}")
    y = np.array([classes.index(c) for c in labels.tolist()], np.int64)
    segment_ids = np.asarray(segment_ids, np.uint64)
    validation = held_out(labels, segment_ids, config.validation_fraction, config.seed)
    missing = [classes[k] for k in range(len(classes)) if not (y[~validation] == k).any()]
    if missing:
        raise ValueError(f"no training node of class {missing} after the split by segment; "
                         f"label more segments of it")
    mean = x[~validation].mean(axis=0)
    std = x[~validation].std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    xs = ((x - mean) / std).astype(np.float32)
    weights = class_weights(y[~validation], len(classes))

    keras.utils.set_random_seed(config.seed)
    model = build_model(x.shape[1], len(classes), config)
    losses = _fit(model, (xs[~validation], y[~validation], weights[y[~validation]]),
                  (xs[validation], y[validation], weights[y[validation]]), config, verbose)
    _exact_spectral_norms(model)
    fit_posterior(model, xs[~validation], config.ridge)
    classifier = Classifier(config, classes, mean, std, input or {}, {}, model)
    best = int(np.argmin(losses))
    predicted = classifier.predict(x[validation])[0].argmax(axis=1)
    classifier.metrics = {
        "epochs": len(losses), "best_epoch": best + 1, "val_loss": float(losses[best]),
        "val_balanced_accuracy": balanced_accuracy(y[validation], predicted),
        "train_nodes": {c: int((y[~validation] == k).sum()) for k, c in enumerate(classes)},
        "val_nodes": {c: int((y[validation] == k).sum()) for k, c in enumerate(classes)},
        "train_segments": int(len(np.unique(segment_ids[~validation]))),
        "val_segments": int(len(np.unique(segment_ids[validation])))}
    return classifier


# Metrics -------------------------------------------------------------------------------------

def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean over present classes of the fraction of their nodes predicted right."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else float("nan")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for telling `positive` nodes from the others."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        raise ValueError("AUROC needs both positive and negative nodes")
    return float(roc_auc_score(positive, scores))


def train_on_tree(tree_path: str, labels, config: ClassifierConfig = ClassifierConfig(),
                  classes: Sequence[str] | None = None, verbose: int = 0) -> Classifier:
    """Train on the labelled nodes of one embedding tree (written here, with info.json), and
    record its variant, radius and embedding model as the classifier's input."""
    from segclr_beam.labels import labelled_nodes
    from segclr_beam.reader import EmbeddingReader

    info = EmbeddingReader(tree_path).info
    if info is None:
        raise ValueError(f"{tree_path} has no info.json: a classifier records the variant and "
                         f"embedding model of the tree it is trained on")
    nodes, names = labelled_nodes(tree_path, labels, classes)
    return train(nodes.features, names, nodes.segment_ids, config, classes=classes,
                 input=tree_input(tree_path, info), verbose=verbose)


def tree_input(tree_path: str, info: dict) -> dict:
    """What a classifier records of the tree it was trained on, and apply checks."""
    return {"tree": tree_path.rstrip("/"), "variant": info["variant"],
            "aggregation_radius_nm": info["aggregation_radius_nm"], "model": info.get("model")}
