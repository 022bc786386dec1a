"""The SegCLR network against an independent numpy reference, checkpoint import, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

from segclr_beam import model as segclr_model
from segclr_beam.model import Architecture, CheckpointMismatchError

REPO = Path(__file__).resolve().parents[1]
# Every variable of the published checkpoints: name, dtype, shape.
TSV = REPO / "tests" / "data" / "segclr-tf1-checkpoint-variables.tsv"
SMALL = Architecture(widths=(4, 8, 8, 16), input_size=33, bottleneck_width=16, embedding_dim=8)
# Published widths on a small input: the checkpoint variables do not depend on input size.
PUBLISHED_WIDTHS = Architecture(input_size=33)
# Agreement to float32 precision: worst absolute error over the largest embedding value
# (measured: 3e-7 at small widths, 6e-7 at published widths).
RELATIVE_TOLERANCE = 2e-6
# The serving form (conversion and batch norms folded into convolutions) against the Keras
# layers: the same sums in another order, so float32 rounding apart (measured: at most 1e-6).
SERVING_TOLERANCE = 1e-5

# ---------------------------------------------------------------- checkpoint variables as
# published, written from the naming in spec/model.md (independent of segclr_beam.model).


def published_variables(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every variable of a published checkpoint, training-only ones included."""
    variables: dict[str, tuple[int, ...]] = {}

    def conv(scope, size, cin, cout):
        variables[f"{scope}/kernel"] = (size, size, size, cin, cout)
        variables[f"{scope}/bias"] = (cout,)

    def bn(scope, width, renorm):
        extras = ("moving_stddev", "renorm_mean", "renorm_stddev") if renorm else ()
        for name in ("gamma", "beta", "moving_mean", "moving_variance") + extras:
            variables[f"{scope}/{name}"] = (width,)

    base = "base_model_0/resnet18"
    conv(f"{base}/stage_1/conv1", 7, 1, arch.widths[0])
    bn(f"{base}/stage_1/bn1", arch.widths[0], renorm=False)
    cin = arch.widths[0]
    for stage, width in enumerate(arch.widths, start=2):
        for block in "ab":
            scope = f"{base}/stage_{stage}/block_{block}"
            for i in range(2):
                conv(f"{scope}/conv_{i}", 3, cin if i == 0 else width, width)
                bn(f"{scope}/bn_{i}", width, renorm=True)
            if block == "a":
                conv(f"{scope}/shortcut_conv", 1, cin, width)
                bn(f"{scope}/shortcut_bn", width, renorm=True)
            cin = width
    heads = {"bottleneck_head_0": [cin, arch.bottleneck_width, arch.bottleneck_width,
                                   arch.embedding_dim],
             "projection_head_0_0": [arch.embedding_dim] * 3 + [16]}
    for head, widths in heads.items():
        for i in range(3):
            variables[f"{head}/nl_{i}/dense/kernel"] = (widths[i], widths[i + 1])
            bn(f"{head}/nl_{i}/nl_{i}_bn", widths[i + 1], renorm=False)
    return variables


def random_values(variables: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random float32 values with the scales of a trained network (positive variances)."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, shape in variables.items():
        last = name.rsplit("/", 1)[1]
        if last == "kernel":
            value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        elif last in ("moving_variance", "gamma", "moving_stddev", "renorm_stddev"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0, 0.3, shape)
        values[name] = value.astype(np.float32)
    return values


def write_tf1_checkpoint(prefix: Path, values: dict[str, np.ndarray]) -> str:
    """A name-based checkpoint: the keys are the TF1 variable names."""
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[n]) for n in names])
    return str(prefix)


def write_tf2resaved_checkpoint(prefix: Path, values: dict[str, np.ndarray]) -> str:
    """An object-based checkpoint holding the TF1 variables in a variable store."""
    store = tf.Module()
    store._vars = {name: tf.Variable(value) for name, value in values.items()}
    return tf.train.Checkpoint(_tf1_style_var_store=store).save(str(prefix))


def read_tsv() -> dict[str, tuple[int, ...]]:
    variables = {}
    for line in TSV.read_text().splitlines():
        name, dtype, shape = line.split("\t")
        assert dtype == "float32"
        variables[name] = tuple(json.loads(shape))
    return variables


# ---------------------------------------------------------------- numpy reference network


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding: output ceil(size / stride), the odd voxel at the end."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def windows(x: np.ndarray, kernel: int, stride: int, fill: float) -> np.ndarray:
    """[B, z, y, x, C] -> SAME windows [B, z', y', x', C, k, k, k]."""
    pads = [(0, 0)] + [same_padding(n, kernel, stride) for n in x.shape[1:4]] + [(0, 0)]
    padded = np.pad(x, pads, constant_values=fill)
    view = sliding_window_view(padded, (kernel,) * 3, axis=(1, 2, 3))
    out = view[:, ::stride, ::stride, ::stride]
    assert out.shape[1:4] == tuple(-(-n // stride) for n in x.shape[1:4])
    return out


def reference_embeddings(values: dict[str, np.ndarray], cutouts: np.ndarray,
                         arch: Architecture) -> np.ndarray:
    """spec/model.md in float64 numpy, reading the TF1-named variables directly."""
    p = {name: v.astype(np.float64) for name, v in values.items()}

    def conv(x, scope, stride):
        kernel = p[f"{scope}/kernel"]
        w = windows(x, kernel.shape[0], stride, 0.0)
        return np.tensordot(w, kernel.transpose(3, 0, 1, 2, 4), axes=4) + p[f"{scope}/bias"]

    def bn(x, scope):
        scale = p[f"{scope}/gamma"] / np.sqrt(p[f"{scope}/moving_variance"] + 1e-5)
        return (x - p[f"{scope}/moving_mean"]) * scale + p[f"{scope}/beta"]

    def relu(x):
        return np.maximum(x, 0)

    x = (cutouts.astype(np.float64) / 255)[..., None]
    base = "base_model_0/resnet18"
    x = bn(conv(x, f"{base}/stage_1/conv1", 2), f"{base}/stage_1/bn1")
    x = windows(x, 3, 2, -np.inf).max(axis=(5, 6, 7))
    for stage in range(2, len(arch.widths) + 2):
        for block in "ab":
            scope = f"{base}/stage_{stage}/block_{block}"
            stride = 2 if block == "a" and stage > 2 else 1
            main = bn(relu(conv(x, f"{scope}/conv_0", stride)), f"{scope}/bn_0")
            main = bn(relu(conv(main, f"{scope}/conv_1", 1)), f"{scope}/bn_1")
            shortcut = x
            if block == "a":
                shortcut = bn(conv(x, f"{scope}/shortcut_conv", stride), f"{scope}/shortcut_bn")
            x = relu(main + shortcut)
    x = x.mean(axis=(1, 2, 3))
    for i in range(3):
        x = bn(x @ p[f"bottleneck_head_0/nl_{i}/dense/kernel"],
               f"bottleneck_head_0/nl_{i}/nl_{i}_bn")
        x = relu(x) if i < 2 else x
    return x


def random_cutouts(n: int, size: int, seed: int) -> np.ndarray:
    """Masked-EM-like uint8 cutouts: noise inside a random blob, zeros outside."""
    rng = np.random.default_rng(seed)
    em = rng.integers(0, 256, (n, size, size, size), dtype=np.uint8)
    zz, yy, xx = np.mgrid[:size, :size, :size] - size // 2
    radius = rng.uniform(0.3, 0.6, (n, 1, 1, 1)) * size
    return np.where(zz**2 + yy**2 + xx**2 < radius**2, em, 0).astype(np.uint8)


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance=RELATIVE_TOLERANCE):
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error < tolerance, f"relative error {error:.2e} >= {tolerance:.0e}"


# ---------------------------------------------------------------- tests


def test_variables_of_the_default_network_are_the_published_ones():
    tsv = read_tsv()
    assert published_variables(Architecture()) == tsv
    inference = {n: s for n, s in tsv.items() if not segclr_model.is_training_only(n, set(tsv))}
    assert segclr_model.checkpoint_variables() == inference
    assert len(inference) == 141
    assert segclr_model.build_model().count_params() == 33_740_224


def serve(network: tf.keras.Model, arch: Architecture, cutouts: np.ndarray) -> np.ndarray:
    """Embeddings of the serving form of a loaded network."""
    return segclr_model.ServingNetwork(network, arch)(tf.constant(cutouts)).numpy()


# Odd and even sizes: the stem's SAME padding is 3 + 3 on odd sizes, 2 + 3 on even ones.
@pytest.mark.parametrize("input_size", [33, 24, 64, 65])
def test_forward_pass_matches_numpy_reference(tmp_path, input_size):
    arch = Architecture(widths=SMALL.widths, input_size=input_size,
                        bottleneck_width=SMALL.bottleneck_width, embedding_dim=SMALL.embedding_dim)
    values = random_values(published_variables(arch), seed=1)
    network = segclr_model.build_model(arch)
    segclr_model.load_checkpoint(network, write_tf1_checkpoint(tmp_path / "ckpt", values))
    cutouts = random_cutouts(2, input_size, seed=2)
    expected = reference_embeddings(values, cutouts, arch)
    actual = segclr_model.embed(network, cutouts)
    assert actual.shape == (2, arch.embedding_dim) and actual.dtype == np.float32
    assert np.abs(expected).max() > 0.5  # a real signal, not a collapsed network
    assert_close(actual, expected)
    served = serve(network, arch, cutouts)
    assert served.shape == actual.shape and served.dtype == np.float32
    assert_close(served, expected)
    assert_close(served, actual)


def test_published_layouts_load_alike_and_match_reference(tmp_path):
    values = random_values(read_tsv(), seed=3)
    tf1 = write_tf1_checkpoint(tmp_path / "tf1" / "model.ckpt-1", values)
    tf2 = write_tf2resaved_checkpoint(tmp_path / "tf2" / "model.ckpt-1.tf2resaved", values)
    keys = tf.train.load_checkpoint(tf2).get_variable_to_shape_map()
    assert ("_tf1_style_var_store/_vars/base_model_0.Sresnet18.Sstage_1.Sconv1.Skernel"
            "/.ATTRIBUTES/VARIABLE_VALUE") in keys
    assert {"_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE"} <= set(keys)

    cutouts = random_cutouts(2, PUBLISHED_WIDTHS.input_size, seed=4)
    embeddings = []
    for prefix in (tf1, tf2):
        network = segclr_model.build_model(PUBLISHED_WIDTHS)
        segclr_model.load_checkpoint(network, prefix)
        for name, weight in segclr_model.checkpoint_weights(network).items():
            np.testing.assert_array_equal(weight.numpy(), values[name], err_msg=name)
        embeddings.append(segclr_model.embed(network, cutouts))
        assert_close(serve(network, PUBLISHED_WIDTHS, cutouts), embeddings[-1],
                     tolerance=SERVING_TOLERANCE)
    np.testing.assert_array_equal(embeddings[0], embeddings[1])
    assert_close(embeddings[0], reference_embeddings(values, cutouts, PUBLISHED_WIDTHS))


@pytest.mark.parametrize("layout", [write_tf1_checkpoint, write_tf2resaved_checkpoint])
def test_export_of_demo_widths_runs_the_serving_form_with_keras_embeddings(tmp_path, layout):
    arch = Architecture(widths=(16, 32, 64, 128), input_size=65)
    prefix = layout(tmp_path / "ckpt" / "model.ckpt-1", random_values(published_variables(arch),
                                                                       seed=8))
    identity = segclr_model.export_saved_model(str(tmp_path / "model"), arch, checkpoint=prefix)
    assert "base_model_0/resnet18/stage_1/bn1" in identity["graph"]["folded_batch_norm"]
    assert segclr_model.model_identity(str(tmp_path / "model")) == identity
    network = segclr_model.build_model(arch)
    segclr_model.load_checkpoint(network, prefix)
    cutouts = random_cutouts(3, arch.input_size, seed=9)
    serving = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"]
    served = serving(cutouts=tf.constant(cutouts))["embeddings"].numpy()
    assert_close(served, segclr_model.embed(network, cutouts), tolerance=SERVING_TOLERANCE)


def small_values(seed=5) -> dict[str, np.ndarray]:
    return random_values(published_variables(SMALL), seed)


def load_small(prefix: str):
    network = segclr_model.build_model(SMALL)
    segclr_model.load_checkpoint(network, prefix)
    return network


def test_training_state_is_ignored(tmp_path):
    values = small_values()
    kernel = "base_model_0/resnet18/stage_2/block_a/conv_0/kernel"
    values[f"{kernel}/Momentum"] = np.zeros_like(values[kernel])
    values["global_step"] = np.zeros((), np.float32)
    load_small(write_tf1_checkpoint(tmp_path / "ckpt", values))
    load_small(write_tf2resaved_checkpoint(tmp_path / "obj", values))


@pytest.mark.parametrize("layout", [write_tf1_checkpoint, write_tf2resaved_checkpoint])
def test_missing_variable_is_named(tmp_path, layout):
    values = small_values()
    del values["base_model_0/resnet18/stage_3/block_b/bn_1/moving_variance"]
    with pytest.raises(CheckpointMismatchError,
                       match=r"1 missing variables:\n.*stage_3/block_b/bn_1/moving_variance "
                             r"\(expected float32 \[8\]\)"):
        load_small(layout(tmp_path / "ckpt", values))


@pytest.mark.parametrize("layout", [write_tf1_checkpoint, write_tf2resaved_checkpoint])
def test_misshapen_variable_is_named(tmp_path, layout):
    values = small_values()
    name = "bottleneck_head_0/nl_1/dense/kernel"
    values[name] = np.zeros((16, 17), np.float32)
    with pytest.raises(CheckpointMismatchError,
                       match=f"{name}: expected float32 \\[16, 16\\], found float32 \\[16, 17\\]"):
        load_small(layout(tmp_path / "ckpt", values))


@pytest.mark.parametrize("layout", [write_tf1_checkpoint, write_tf2resaved_checkpoint])
def test_unexpected_variable_is_named(tmp_path, layout):
    values = small_values()
    values["base_model_0/resnet18/stage_6/block_a/conv_0/kernel"] = np.zeros((3,) * 3 + (16, 16),
                                                                          np.float32)
    with pytest.raises(CheckpointMismatchError,
                       match=r"1 unexpected variables:\n.*stage_6/block_a/conv_0/kernel"):
        load_small(layout(tmp_path / "ckpt", values))


def test_mismatch_lists_only_the_first_offenders_and_leaves_model_untouched(tmp_path):
    values = {n: v for n, v in small_values().items() if n.startswith("projection_head_")}
    network = segclr_model.build_model(SMALL)
    before = segclr_model.weights_sha256(network)
    with pytest.raises(CheckpointMismatchError, match=r"141 missing variables:\n(.*\n){10}"
                                                      r"    \.\.\. and 131 more"):
        segclr_model.load_checkpoint(network, write_tf1_checkpoint(tmp_path / "ckpt", values))
    assert segclr_model.weights_sha256(network) == before
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        segclr_model.load_checkpoint(network, str(tmp_path / "nothing-here"))


_FRESH_PROCESS = """
import sys
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = serve(cutouts=tf.constant(np.load(sys.argv[2])))["embeddings"].numpy()
np.save(sys.argv[3], out)
"""


def test_exported_model_gives_keras_embeddings_in_a_fresh_process(tmp_path):
    values = small_values()
    prefix = write_tf2resaved_checkpoint(tmp_path / "ckpt", values)
    out = tmp_path / "model"
    identity = segclr_model.export_saved_model(str(out), SMALL, checkpoint=prefix)
    network = load_small(prefix)
    assert identity == segclr_model.model_identity(str(out))
    assert identity["weights"] == prefix
    assert identity["weights_sha256"] == segclr_model.weights_sha256(network)
    assert identity["architecture"] == SMALL.to_dict()
    assert identity["model_id"].startswith("segclr-") and "random" not in identity["model_id"]

    cutouts = random_cutouts(5, SMALL.input_size, seed=6)
    np.save(tmp_path / "cutouts.npy", cutouts)
    subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(out), str(tmp_path / "cutouts.npy"),
                    str(tmp_path / "embeddings.npy")], check=True, capture_output=True)
    served = np.load(tmp_path / "embeddings.npy")
    assert served.dtype == np.float32 and served.shape == (5, SMALL.embedding_dim)
    assert_close(served, segclr_model.embed(network, cutouts), tolerance=1e-6)

    with pytest.raises(FileExistsError, match="already exists"):
        segclr_model.export_saved_model(str(out), SMALL, checkpoint=prefix)


def export_with_cli(*outs: Path) -> list[subprocess.CompletedProcess]:
    """Export the same random network to each of `outs`, each in a fresh process, at once."""
    runs = [subprocess.Popen(
        [sys.executable, "-m", "segclr_beam.cli", "export-model", "--out", str(out),
         "--widths", "4,8,8,16", "--input-size", "17", "--bottleneck-width", "16",
         "--embedding-dim", "8", "--seed", "7"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}) for out in outs]
    done = []
    for run in runs:
        stdout, stderr = run.communicate()
        assert run.returncode == 0, stderr
        done.append(subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr))
    return done


def test_cli_exports_random_weights_loudly_and_reproducibly(tmp_path):
    """Two fresh processes write the same bytes (names of traced functions count how many
    were traced before in a process, so the exports run in processes of their own)."""
    run, _ = export_with_cli(tmp_path / "random", tmp_path / "again")
    assert "RANDOM weights" in run.stderr
    identity = segclr_model.model_identity(str(tmp_path / "random"))
    assert identity["weights"] == "random-init" and identity["random_seed"] == 7
    assert identity["model_id"].startswith("segclr-random-init-")
    assert identity["signature"]["input"]["shape"] == [None, 17, 17, 17]
    assert json.loads(run.stdout) == identity

    files = sorted(p.relative_to(tmp_path / "random") for p in (tmp_path / "random").rglob("*")
                   if p.is_file())
    assert len(files) == 5
    for name in files:
        assert (tmp_path / "random" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()

    arch = Architecture(widths=(4, 8, 8, 16), input_size=17, bottleneck_width=16, embedding_dim=8)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        other = segclr_model.export_saved_model(str(tmp_path / "other"), arch, seed=8)
    assert other["weights_sha256"] != identity["weights_sha256"]


def test_cli_reports_a_checkpoint_that_does_not_fit(tmp_path):
    from segclr_beam import cli

    prefix = write_tf1_checkpoint(tmp_path / "ckpt", small_values())
    # One stage too many: its weights are missing and the head's input width is wrong.
    with pytest.raises(SystemExit, match=r"export-model: checkpoint .* does not fit .*\n"
                                         r"  30 missing variables:\n.*stage_6/block_a/conv_0/"
                                         r"(.|\n)*nl_0/dense/kernel: expected float32 \[32, 16\]"):
        cli.main(["export-model", "--checkpoint", prefix, "--out", str(tmp_path / "model"),
                  "--widths", "4,8,8,16,32", "--input-size", "33",
                  "--bottleneck-width", "16", "--embedding-dim", "8"])
    assert not (tmp_path / "model").exists()


def test_model_identity_rejects_other_directories(tmp_path):
    with pytest.raises(ValueError, match="not a SegCLR model exported by segclr-beam"):
        segclr_model.model_identity(str(tmp_path))


def test_architecture_validation():
    with pytest.raises(ValueError, match="Architecture.input_size"):
        Architecture(input_size=0)
    with pytest.raises(ValueError, match="Architecture.widths"):
        Architecture(widths=())
    assert Architecture.from_dict(SMALL.to_dict()) == SMALL
