"""The SegCLR embedding network: Keras model, published-checkpoint import, SavedModel export.

The network is the 3-D ResNet-18 behind every published SegCLR checkpoint (h01, MICrONS):
convolutions with bias and SAME padding, blocks ordered conv -> ReLU -> batch norm, a stem
without ReLU, and a three-layer bottleneck head whose 64-d output is the embedding. Every
layer is named after its TF1 variable scope, so the checkpoint variable of a weight is the
layer's scope plus the weight's name; that one rule maps checkpoints onto the model.

The exported SavedModel takes masked-EM uint8 cutouts [B, z, y, x] and returns float32
embeddings [B, D]; a JSON file beside the graph records which weights it holds and the form
it runs. That form, ServingNetwork, is built from the loaded Keras model: the same function
up to float32 rounding, rearranged to run faster (the uint8 conversion and the batch norms
that follow a linear layer folded into it, the other batch norms as one multiply-add).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import AbstractSet, Any, Iterator, Sequence

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from segclr_beam.shards import read_json

keras = tf.keras  # Keras 3, the TensorFlow backend.

BN_EPSILON = 1e-5
STEM = "base_model_0/resnet18/stage_1"
BOTTLENECK = "bottleneck_head_0"
PROJECTION_HEAD = "projection_head_0_0"
PROJECTION_DIM = 16
# The record of the run that trained a checkpoint, in the checkpoint's directory.
TRAINING_RECORD = "training.json"
# The identity record of an exported model, relative to the SavedModel directory.
IDENTITY_FILE = "assets.extra/segclr_model.json"
SERVING_INPUT = "cutouts"
SERVING_OUTPUT = "embeddings"
RANDOM_INIT = "random-init"

# Checkpoint keys of the object-based ("tf2resaved") layout: every TF1 variable sits in
# a variable store under its name, with "/" escaped as ".S" and "." as "..".
_STORE_PREFIX = "_tf1_style_var_store/_vars/"
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_OBJECT_BOOKKEEPING = {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter" + _VALUE_SUFFIX}
# Variables that only training uses: batch-renormalisation extras, the step and the
# non-slot state of TF1's Adam.
_RENORM_EXTRAS = {"moving_stddev", "renorm_mean", "renorm_stddev"}
_TRAINING_STATE = {"global_step", "beta1_power", "beta2_power"}
_PROJECTION_HEAD = "projection_head_"
_SHOWN_OFFENDERS = 10


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Sizes of the network; the defaults are the published SegCLR model."""

    widths: tuple[int, ...] = (64, 128, 256, 512)  # filters of stages 2.. (stem: widths[0])
    input_size: int = 129  # cutout edge in voxels (z = y = x)
    bottleneck_width: int = 512  # hidden width of the bottleneck head
    embedding_dim: int = 64

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"Architecture.widths must be positive integers, got {self.widths}")
        for field in ("input_size", "bottleneck_width", "embedding_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Architecture.{field} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Architecture":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Architecture fields {sorted(unknown)}")
        return cls(**data)


class CheckpointMismatchError(ValueError):
    """A checkpoint's variables do not match the network; the message lists the offenders."""


# ----------------------------------------------------------------------------- network


def _layer_name(scope: str) -> str:
    # Keras layer names cannot hold "/"; TF1 scopes never hold ".".
    return scope.replace("/", ".")


def _scope(layer: keras.layers.Layer) -> str:
    return layer.name.replace(".", "/")


def _conv(x, scope: str, filters: int, size: int, stride: int):
    return keras.layers.Conv3D(filters, size, strides=stride, padding="same",
                               name=_layer_name(scope))(x)


def _bn(x, scope: str):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=_layer_name(scope))(x)


def _relu(x, scope: str):
    return keras.layers.ReLU(name=_layer_name(scope))(x)


def _block(x, scope: str, filters: int, stride: int, projection: bool):
    """Residual block: (conv -> ReLU -> BN) twice, plus a 1^3 conv -> BN shortcut or identity."""
    main = x
    for i, conv_stride in enumerate((stride, 1)):
        main = _conv(main, f"{scope}/conv_{i}", filters, 3, conv_stride)
        main = _relu(main, f"{scope}/relu_{i}")
        main = _bn(main, f"{scope}/bn_{i}")
    shortcut = x
    if projection:
        shortcut = _conv(x, f"{scope}/shortcut_conv", filters, 1, stride)
        shortcut = _bn(shortcut, f"{scope}/shortcut_bn")
    out = keras.layers.Add(name=_layer_name(f"{scope}/add"))([main, shortcut])
    return _relu(out, f"{scope}/relu_out")


def build_model(arch: Architecture = Architecture()) -> keras.Model:
    """The embedding network: float32 [B, z, y, x, 1] in [0, 1] -> embeddings [B, D]."""
    size = arch.input_size
    inputs = keras.Input((size, size, size, 1), name="em")
    x = _conv(inputs, f"{STEM}/conv1", arch.widths[0], 7, 2)
    x = _bn(x, f"{STEM}/bn1")
    x = keras.layers.MaxPooling3D(3, strides=2, padding="same",
                                  name=_layer_name(f"{STEM}/pool"))(x)
    for stage, filters in enumerate(arch.widths, start=2):
        for block in ("a", "b"):
            stride = 2 if block == "a" and stage > 2 else 1
            x = _block(x, f"base_model_0/resnet18/stage_{stage}/block_{block}", filters, stride,
                       projection=block == "a")
    x = keras.layers.GlobalAveragePooling3D(name="global_average_pool")(x)
    x = _head(x, BOTTLENECK, (arch.bottleneck_width, arch.bottleneck_width, arch.embedding_dim))
    return keras.Model(inputs, x, name="segclr")


def _head(x, scope: str, widths: Sequence[int]):
    """Dense layers without bias, each followed by batch norm, ReLU between them."""
    for i, width in enumerate(widths):
        x = keras.layers.Dense(width, use_bias=False, name=_layer_name(f"{scope}/nl_{i}/dense"))(x)
        x = _bn(x, f"{scope}/nl_{i}/nl_{i}_bn")
        if i < len(widths) - 1:
            x = _relu(x, f"{scope}/nl_{i}/relu")
    return x


def build_projection_head(arch: Architecture = Architecture(),
                          projection_dim: int = PROJECTION_DIM) -> keras.Model:
    """The training-only projection head: embeddings [B, D] -> projections [B, projection_dim].

    Its layers carry the published checkpoint scopes (D -> D -> D -> projection_dim).
    """
    inputs = keras.Input((arch.embedding_dim,), name="embedding")
    widths = (arch.embedding_dim, arch.embedding_dim, projection_dim)
    return keras.Model(inputs, _head(inputs, PROJECTION_HEAD, widths), name="projection_head")


def checkpoint_weights(model: keras.Model) -> dict[str, Any]:
    """The model's weights keyed by their TF1 checkpoint variable names."""
    return {f"{_scope(layer)}/{w.name}": w for layer in model.layers for w in layer.weights}


def checkpoint_variables(arch: Architecture = Architecture()) -> dict[str, tuple[int, ...]]:
    """TF1 name -> shape of every checkpoint variable the network needs for inference."""
    return {name: tuple(w.shape) for name, w in checkpoint_weights(build_model(arch)).items()}


def preprocess(cutouts: tf.Tensor) -> tf.Tensor:
    """Masked-EM uint8 [B, z, y, x] -> the network's float32 [B, z, y, x, 1] in [0, 1]."""
    return (tf.cast(cutouts, tf.float32) / 255.0)[..., tf.newaxis]


def embed(model: keras.Model, cutouts: np.ndarray) -> np.ndarray:
    """Embeddings float32 [B, D] of uint8 cutouts [B, z, y, x], run eagerly batch-at-once."""
    return model(preprocess(tf.constant(cutouts, dtype=tf.uint8)), training=False).numpy()


# ----------------------------------------------------------------------------- serving form

# Which form of the network an export runs, recorded in its identity. Exports without the
# record run the Keras layers as built above.
PLAIN_GRAPH = {"stem": "conv", "folded_batch_norm": []}


def _fold_batch_norm(weights: dict[str, np.ndarray], scope: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Scale and offset of an inference-time batch norm: y = x * scale + offset."""
    p = {name: weights[f"{scope}/{name}"].astype(np.float64)
         for name in ("gamma", "beta", "moving_mean", "moving_variance")}
    scale = p["gamma"] / np.sqrt(p["moving_variance"] + BN_EPSILON)
    return scale, p["beta"] - p["moving_mean"] * scale


def _folded(kernel: np.ndarray, bias: np.ndarray | None, scale: np.ndarray,
            offset: np.ndarray) -> tuple[tf.Variable, tf.Variable]:
    """Kernel and bias of a linear layer followed by a batch norm, as one layer (float64 math)."""
    bias = 0.0 if bias is None else bias.astype(np.float64)
    return _variable(kernel.astype(np.float64) * scale), _variable(bias * scale + offset)


def _variable(value: np.ndarray) -> tf.Variable:
    """A float32 weight of the serving network (saved with it, never trained)."""
    return tf.Variable(np.asarray(value, dtype=np.float32), trainable=False)


class Stem(tf.Module):
    """The stem conv 7^3 / stride 2 / SAME straight on the uint8 cutouts: the 1/255 of the
    conversion and the batch norm after it folded into its kernel and bias."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                 offset: np.ndarray):
        super().__init__()
        self.kernel, self.bias = _folded(kernel.astype(np.float64) / 255.0, bias, scale, offset)

    def __call__(self, cutouts: tf.Tensor) -> tf.Tensor:
        x = tf.cast(cutouts, tf.float32)[..., tf.newaxis]
        return tf.nn.bias_add(tf.nn.conv3d(x, self.kernel, [1, 2, 2, 2, 1], "SAME"), self.bias)


class BlockConv(tf.Module):
    """conv 3^3 + bias -> ReLU -> batch norm, the batch norm as one scale and offset.

    The batch norm follows the ReLU, so it cannot fold into the conv; its scale and offset
    are computed once at export (float64 math) and applied in one multiply-add.
    """

    def __init__(self, weights: dict[str, np.ndarray], conv: str, bn: str, stride: int):
        super().__init__()
        self.scope = conv
        self.stride = [1, stride, stride, stride, 1]
        self.kernel = _variable(weights[f"{conv}/kernel"])
        self.bias = _variable(weights[f"{conv}/bias"])
        self.scale, self.offset = (_variable(v) for v in _fold_batch_norm(weights, bn))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv3d(x, self.kernel, self.stride, "SAME"),
                                      self.bias))
        return x * self.scale + self.offset


class Shortcut(tf.Module):
    """The projection shortcut: conv 1^3 with its stride, batch norm folded in."""

    def __init__(self, weights: dict[str, np.ndarray], scope: str, stride: int):
        super().__init__()
        self.scope = f"{scope}/shortcut_conv"
        self.stride = [1, stride, stride, stride, 1]
        self.kernel, self.bias = _folded(weights[f"{scope}/shortcut_conv/kernel"],
                                         weights[f"{scope}/shortcut_conv/bias"],
                                         *_fold_batch_norm(weights, f"{scope}/shortcut_bn"))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.bias_add(tf.nn.conv3d(x, self.kernel, self.stride, "VALID"), self.bias)


class Block(tf.Module):
    """Residual block: two BlockConvs plus a Shortcut or the identity, then ReLU."""

    def __init__(self, weights: dict[str, np.ndarray], scope: str, stride: int,
                 projection: bool):
        super().__init__()
        self.scope = scope
        self.convs = [BlockConv(weights, f"{scope}/conv_{i}", f"{scope}/bn_{i}", s)
                      for i, s in enumerate((stride, 1))]
        self.shortcut = Shortcut(weights, scope, stride) if projection else None

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        main = self.convs[1](self.convs[0](x))
        return tf.nn.relu(main + (x if self.shortcut is None else self.shortcut(x)))


class Head(tf.Module):
    """Global average pool and the bottleneck head, each batch norm folded into its dense."""

    def __init__(self, weights: dict[str, np.ndarray], layers: int):
        super().__init__()
        self.dense = [_folded(weights[f"{BOTTLENECK}/nl_{i}/dense/kernel"], None,
                              *_fold_batch_norm(weights, f"{BOTTLENECK}/nl_{i}/nl_{i}_bn"))
                      for i in range(layers)]

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.reduce_mean(x, axis=[1, 2, 3])
        for i, (kernel, bias) in enumerate(self.dense):
            x = tf.matmul(x, kernel) + bias
            if i < len(self.dense) - 1:
                x = tf.nn.relu(x)
        return x


class ServingNetwork(tf.Module):
    """The network in the form exports run: the loaded weights, folded where that is exact
    up to float32 rounding, behind uint8 cutouts [B, z, y, x] -> embeddings [B, D].

    Batch norms directly after a linear layer (stem, shortcuts, head) are folded into it;
    block batch norms follow a ReLU and stay, as a scale and an offset. graph() records
    the form.
    """

    def __init__(self, model: keras.Model, arch: Architecture):
        super().__init__(name="segclr")
        weights = {name: w.numpy() for name, w in checkpoint_weights(model).items()}
        self.stem = Stem(weights[f"{STEM}/conv1/kernel"], weights[f"{STEM}/conv1/bias"],
                         *_fold_batch_norm(weights, f"{STEM}/bn1"))
        self.blocks = []
        for stage in range(2, len(arch.widths) + 2):
            for block in ("a", "b"):
                stride = 2 if block == "a" and stage > 2 else 1
                self.blocks.append(Block(weights, f"base_model_0/resnet18/stage_{stage}/"
                                         f"block_{block}", stride, projection=block == "a"))
        self.head = Head(weights, 3)

    def graph(self) -> dict[str, Any]:
        """The form this network runs, for the identity record."""
        folded = [f"{STEM}/bn1"] + [f"{block.scope}/shortcut_bn" for block in self.blocks
                                    if block.shortcut is not None]
        return {"stem": "conv",
                "folded_batch_norm": folded + [f"{BOTTLENECK}/nl_{i}/nl_{i}_bn"
                                               for i in range(len(self.head.dense))]}

    @staticmethod
    def pool(x: tf.Tensor) -> tf.Tensor:
        """Max-pool 3^3 / stride 2 / SAME, as a 2-D pool over (y, x) then one over z: the
        same maxima, and at 64 channels the two 2-D pools take half the time of oneDNN's 3-D
        pooling; pooling (y, x) first leaves z a quarter of the data."""
        batch = tf.shape(x)[0]
        _, depth, height, width, channels = x.shape
        x = tf.nn.max_pool2d(tf.reshape(x, [-1, height, width, channels]), 3, 2, "SAME")
        height, width = x.shape[1], x.shape[2]
        x = tf.reshape(x, [batch, depth, 1, height * width * channels])
        x = tf.nn.max_pool2d(x, [3, 1], [2, 1], "SAME")
        return tf.reshape(x, [batch, x.shape[1], height, width, channels])

    def __call__(self, cutouts: tf.Tensor) -> tf.Tensor:
        x = self.pool(self.stem(cutouts))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# ----------------------------------------------------------------------------- weights


def _unescape(path: str) -> str:
    """Undo the object-based checkpoint escaping ("/" -> ".S", "." -> "..")."""
    def replace(match: re.Match) -> str:
        escaped = {"S": "/", ".": "."}.get(match.group(1))
        if escaped is None:
            raise CheckpointMismatchError(f"unknown escape {match.group(0)!r} in key {path!r}")
        return escaped
    return re.sub(r"\.(.)", replace, path)


def _variable_names(keys: Sequence[str]) -> dict[str, str]:
    """TF1 variable name -> checkpoint key, for both published key layouts.

    Bookkeeping of object-based checkpoints (object graph, save counter, optimizer state)
    is left out.
    """
    names: dict[str, str] = {}
    for key in keys:
        if key in _OBJECT_BOOKKEEPING or "/.OPTIMIZER_SLOT/" in key or key.startswith("optimizer/"):
            continue
        name = key
        if key.startswith(_STORE_PREFIX) and key.endswith(_VALUE_SUFFIX):
            name = _unescape(key[len(_STORE_PREFIX):-len(_VALUE_SUFFIX)])
        if name in names:
            raise CheckpointMismatchError(
                f"variable {name!r} appears twice, as {names[name]!r} and {key!r}")
        names[name] = key
    return names


def is_training_only(name: str, all_names: AbstractSet[str] = frozenset()) -> bool:
    """Whether a TF1 checkpoint variable is used only in training (inference ignores it).

    TF1 optimizers name a slot after its variable plus one component ("<var>/Momentum"),
    so a name extending another name in `all_names` by one component is a slot.
    """
    parent, _, last = name.rpartition("/")
    return (name.startswith(_PROJECTION_HEAD) or last in _RENORM_EXTRAS
            or name in _TRAINING_STATE or parent in all_names)


def _listing(title: str, lines: list[str]) -> str:
    shown = "\n".join(f"    {line}" for line in lines[:_SHOWN_OFFENDERS])
    hidden = len(lines) - _SHOWN_OFFENDERS
    more = f"\n    ... and {hidden} more" if hidden > 0 else ""
    return f"  {len(lines)} {title}:\n{shown}{more}"


def _checkpoint_files(prefix: str) -> list[str]:
    """The files of the checkpoint `prefix` (its .index and data shards), local or remote."""
    return sorted(m.path for m in FileSystems.match([prefix + ".*"])[0].metadata_list
                  if m.path == prefix + ".index" or m.path.startswith(prefix + ".data-"))


@contextlib.contextmanager
def local_checkpoint(prefix: str) -> Iterator[str]:
    """A local prefix of the checkpoint; remote ones (gs://) are copied to a temporary dir.

    TensorFlow's own gs:// filesystem ignores storage emulators and other Beam
    filesystem settings, so remote checkpoints are read through Beam's FileSystems.
    """
    if _is_local(prefix):
        yield prefix
        return
    name = prefix.rstrip("/").rpartition("/")[2]
    with tempfile.TemporaryDirectory(prefix="segclr-checkpoint-") as tmp:
        for path in _checkpoint_files(prefix):
            target = os.path.join(tmp, name + path[len(prefix):])
            with FileSystems.open(path) as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
        yield os.path.join(tmp, name)


def load_checkpoint(model: keras.Model | Sequence[keras.Model], prefix: str) -> None:
    """Set the model's weights from a SegCLR checkpoint in either published key layout.

    Strict: every weight must be present as float32 with the model's shape, and every
    other variable must be training-only; otherwise CheckpointMismatchError lists the
    first offenders of each kind. The model is untouched unless everything matches.
    Several models (the network and its projection head) load from one checkpoint together.
    """
    models = [model] if isinstance(model, keras.Model) else list(model)
    with local_checkpoint(prefix) as local:
        try:
            reader = tf.train.load_checkpoint(local)
        except (tf.errors.OpError, ValueError) as e:
            raise ValueError(f"cannot read checkpoint {prefix!r}: {e}") from e
        _load_weights(models, reader, prefix)


def _load_weights(models: list[keras.Model], reader, prefix: str) -> None:
    """Check every weight of `models` against the checkpoint, then assign them all."""
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    keys = _variable_names(list(shapes))
    weights = {name: w for m in models for name, w in checkpoint_weights(m).items()}
    missing, misshapen, unexpected = [], [], []
    for name, weight in weights.items():
        expected = list(weight.shape)
        if name not in keys:
            missing.append(f"{name} (expected float32 {expected})")
            continue
        found, dtype = shapes[keys[name]], dtypes[keys[name]]
        if found != expected or dtype != tf.float32:
            misshapen.append(f"{name}: expected float32 {expected}, found {dtype.name} {found}")
    all_names = set(keys)
    for name, key in sorted(keys.items()):
        if name not in weights and not is_training_only(name, all_names):
            unexpected.append(f"{name} ({dtypes[key].name} {shapes[key]}, key {key!r})")
    problems = [_listing(title, lines) for title, lines in (
        ("missing variables", missing), ("variables of the wrong shape or dtype", misshapen),
        ("unexpected variables", unexpected)) if lines]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {prefix!r} does not fit the SegCLR network with {len(weights)} "
            f"weights:\n" + "\n".join(problems))
    for name, weight in weights.items():
        weight.assign(reader.get_tensor(keys[name]))


def random_init(model: keras.Model, seed: int) -> None:
    """He-normal kernels drawn from numpy with `seed`; biases 0 and batch norm identity."""
    rng = np.random.default_rng(seed)
    for name, weight in checkpoint_weights(model).items():
        if name.endswith("/kernel"):
            shape = tuple(weight.shape)
            std = np.sqrt(2.0 / np.prod(shape[:-1]))
            weight.assign(rng.normal(0.0, std, shape).astype(np.float32))


def weights_sha256(model: keras.Model) -> str:
    """Content hash of the weights: name, shape and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, weight in sorted(checkpoint_weights(model).items()):
        value = np.ascontiguousarray(weight.numpy(), dtype="<f4")
        digest.update(f"{name}\0{list(value.shape)}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- export


class _Serving(tf.Module):
    """What the SavedModel holds: the serving network behind a uint8-in signature."""

    def __init__(self, network: ServingNetwork, input_size: int):
        super().__init__(name="segclr")
        self.network = network
        spec = tf.TensorSpec([None, input_size, input_size, input_size], tf.uint8,
                             name=SERVING_INPUT)
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, cutouts: tf.Tensor) -> dict[str, tf.Tensor]:
        return {SERVING_OUTPUT: self.network(cutouts)}


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def _files_under(directory: str) -> list:
    """Metadata of every file under `directory`; on object stores, under the prefix."""
    return FileSystems.match([FileSystems.join(directory.rstrip("/"), "**")])[0].metadata_list


def copy_tree(src: str, dst: str) -> None:
    """Copy every file under directory `src` to `dst` (local paths or any Beam filesystem)."""
    src = src.rstrip("/")
    matches = _files_under(src)
    if not matches:
        raise FileNotFoundError(f"no files under {src!r}")
    for meta in sorted(matches, key=lambda m: m.path):
        relative = meta.path[len(src):].lstrip("/")
        target = FileSystems.join(dst, *relative.split("/"))
        if _is_local(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(meta.path) as fin, FileSystems.create(target) as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)


def _identity(arch: Architecture, weights: str, seed: int | None, digest: str,
              graph: dict[str, Any], training: dict | None = None) -> dict:
    content = json.dumps({"architecture": arch.to_dict(), "weights_sha256": digest},
                         sort_keys=True)
    model_id = hashlib.sha256(content.encode()).hexdigest()[:16]
    random_tag = f"{RANDOM_INIT}-" if weights == RANDOM_INIT else ""
    return {
        "model_id": f"segclr-{random_tag}{model_id}",
        "architecture": arch.to_dict(),
        "weights": weights,  # the checkpoint prefix, or "random-init"
        "random_seed": seed,
        "weights_sha256": digest,
        "graph": graph,  # the form the SavedModel runs (PLAIN_GRAPH if absent)
        "signature": {
            "name": "serving_default",
            "input": {"name": SERVING_INPUT, "dtype": "uint8",
                      "shape": [None, arch.input_size, arch.input_size, arch.input_size],
                      "axes": "b z y x", "content": "masked EM"},
            "output": {"name": SERVING_OUTPUT, "dtype": "float32",
                       "shape": [None, arch.embedding_dim]},
        },
        **({"training": training} if training is not None else {}),
    }


def _pin_fingerprint_uuid(saved_model_dir: str, identity: dict) -> None:
    """Replace the random uuid TensorFlow writes into fingerprint.pb by a hash of the
    identity record, so that exporting the same model twice gives the same bytes."""
    from tensorflow.core.protobuf import fingerprint_pb2

    path = os.path.join(saved_model_dir, "fingerprint.pb")
    fingerprint = fingerprint_pb2.FingerprintDef()
    with open(path, "rb") as f:
        fingerprint.ParseFromString(f.read())
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    fingerprint.uuid = str(int(digest[:32], 16))
    with open(path, "wb") as f:
        f.write(fingerprint.SerializeToString(deterministic=True))


def training_record(prefix: str) -> dict | None:
    """The record that `segclr-beam train` wrote beside checkpoint `prefix`, if it did."""
    directory, _, name = prefix.rstrip("/").rpartition("/")
    path = FileSystems.join(directory or ".", TRAINING_RECORD)
    if not FileSystems.exists(path):
        return None
    try:
        record = read_json(path)
        return record if record["checkpoint"] == name else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a training record: {e!r}") from None


def export_saved_model(out: str, arch: Architecture | None = None,
                       checkpoint: str | None = None, seed: int = 0) -> dict:
    """Write the network as a SavedModel in `out` and return its identity record.

    Without `checkpoint` the weights are random (seeded); that is warned about and
    recorded in the identity. A checkpoint written by `segclr-beam train` brings its
    architecture and the record of its training run, which the identity keeps; otherwise
    `arch` defaults to the published network. `out` must not exist yet; a failure leaves
    nothing there.
    """
    if FileSystems.exists(out) or _files_under(out):
        raise FileExistsError(f"model output {out!r} already exists; choose a new directory")
    training = training_record(checkpoint) if checkpoint is not None else None
    trained = Architecture.from_dict(training["architecture"]) if training else None
    if arch is not None and trained is not None and arch != trained:
        raise ValueError(f"checkpoint {checkpoint!r} was trained with architecture "
                         f"{trained.to_dict()}, not {arch.to_dict()}")
    arch = arch or trained or Architecture()
    model = build_model(arch)
    if checkpoint is None:
        warnings.warn(f"exporting a SegCLR model with RANDOM weights (seed {seed}): its "
                      f"embeddings mean nothing; pass a checkpoint for real embeddings",
                      stacklevel=2)
        random_init(model, seed)
    else:
        load_checkpoint(model, checkpoint)
    network = ServingNetwork(model, arch)
    identity = _identity(arch, RANDOM_INIT if checkpoint is None else checkpoint,
                         seed if checkpoint is None else None, weights_sha256(model),
                         network.graph(), training)
    local_parent = os.path.dirname(os.path.abspath(out)) if _is_local(out) else None
    if local_parent is not None:
        os.makedirs(local_parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=local_parent, prefix=".segclr-export-") as tmp:
        staged = os.path.join(tmp, "model")
        serving = _Serving(network, arch.input_size)
        tf.saved_model.save(serving, staged, signatures={"serving_default": serving.serve})
        _pin_fingerprint_uuid(staged, identity)
        # The identity goes last: a directory without it is not a usable model.
        if local_parent is not None:
            _write_identity(staged, identity)
            os.rename(staged, out)
        else:
            copy_tree(staged, out)
            _write_identity(out, identity)
    return identity


def _identity_path(saved_model_dir: str) -> str:
    return FileSystems.join(saved_model_dir.rstrip("/"), *IDENTITY_FILE.split("/"))


def _write_identity(saved_model_dir: str, identity: dict) -> None:
    path = _identity_path(saved_model_dir)
    if _is_local(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileSystems.create(path) as f:
        f.write((json.dumps(identity, indent=2, sort_keys=True) + "\n").encode())


def model_identity(saved_model_dir: str) -> dict:
    """The identity record of an exported model (architecture, weights source, hashes, and
    the form of the graph; exports that do not record it run the plain one)."""
    path = _identity_path(saved_model_dir)
    try:
        identity = read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{saved_model_dir!r} is not a SegCLR model exported by segclr-beam "
                         f"(cannot read {path}: {e})") from e
    return {"graph": copy.deepcopy(PLAIN_GRAPH), **identity}
