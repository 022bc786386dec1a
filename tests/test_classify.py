"""Classifiers on embeddings, against independent references on Gaussian clusters in 16-d."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from segclr_beam import classify
from segclr_beam.config import ConfigError

DIM = 16
# Small and short, so that each training takes seconds; the published sizes are the defaults.
FAST = classify.ClassifierConfig(hidden=32, random_features=256, max_epochs=60, patience=10,
                                 batch_size=64)


def _clusters(seed: int = 0):
    """Classes a and b on either side of the origin along one direction; out-of-distribution
    clouds c (further along it, where a linear classifier is most confident) and d (off to
    the side). Each segment is a cloud of 20 nodes with its own small offset."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=DIM)
    e /= np.linalg.norm(e)
    f = rng.normal(size=DIM)
    f -= (f @ e) * e
    f /= np.linalg.norm(f)
    centres = {"a": -3 * e, "b": 3 * e, "c": 12 * e, "d": 10 * f}

    def nodes(names, segments):
        x, y, g = [], [], []
        for k, name in enumerate(names):
            for s in range(segments):
                offset = rng.normal(scale=0.3, size=DIM)
                x.append(centres[name] + offset + rng.normal(size=(20, DIM)))
                y += [name] * 20
                g += [1000 * k + s + 1] * 20
        return np.concatenate(x), np.array(y, dtype=object), np.array(g, np.uint64)

    return nodes("ab", 10), nodes("abcd", 5)


@pytest.fixture(scope="module")
def trained():
    (x, y, g), test = _clusters()
    heads = {sngp: classify.train(x, y, g, dataclasses.replace(FAST, sngp=sngp))
             for sngp in (False, True)}
    return heads, test


def test_power_iteration_bounds_the_spectral_norm():
    import keras

    layer = classify.spectral_dense(8, 0.95, 0.0, seed=3, name="sn")
    layer.build((None, 12))
    rng = np.random.default_rng(0)
    layer.kernel.assign(rng.normal(scale=3.0, size=(12, 8)).astype(np.float32))
    for _ in range(30):
        kernel = keras.ops.convert_to_numpy(layer.normalized_kernel(training=True))
    assert np.linalg.norm(kernel, 2) == pytest.approx(0.95, rel=1e-4)
    small = np.eye(12, 8, dtype=np.float32) * 0.5  # already within the bound: unchanged
    layer.kernel.assign(small)
    for _ in range(30):
        kernel = keras.ops.convert_to_numpy(layer.normalized_kernel(training=True))
    np.testing.assert_allclose(kernel, small, rtol=1e-5)
    assert isinstance(layer, keras.layers.Layer)


def test_trained_sngp_kernels_stay_within_the_bound(trained):
    import keras

    heads, _ = trained
    bounded = [layer for layer in heads[True].model.layers if hasattr(layer, "normalized_kernel")]
    assert len(bounded) == 1 + FAST.blocks
    for layer in bounded:
        # After training the iteration vector is the top singular vector, so inference scales
        # by the exact norm: the bound holds up to float32 rounding.
        kernel = keras.ops.convert_to_numpy(layer.normalized_kernel())
        assert np.linalg.norm(kernel, 2) <= 0.95 * (1 + 1e-5)


def test_both_heads_learn_the_trained_classes(trained):
    heads, (x, y, _) = trained
    known = np.isin(y, ["a", "b"])
    for model in heads.values():
        assert model.classes == ("a", "b")
        probabilities, _ = model.predict(x[known])
        predicted = np.array(model.classes)[probabilities.argmax(axis=1)]
        assert (predicted == y[known]).mean() > 0.95
        assert model.metrics["val_balanced_accuracy"] > 0.95
        assert model.metrics["train_segments"] + model.metrics["val_segments"] == 20


def test_gp_variance_is_larger_far_from_the_data(trained):
    heads, (x, y, _) = trained
    _, variance = heads[True].outputs(x)
    near, far = variance[np.isin(y, ["a", "b"])], variance[np.isin(y, ["c", "d"])]
    assert np.median(far) > 5 * np.median(near)
    _, plain = heads[False].outputs(x)
    assert not plain.any()


def test_outputs_are_the_network_and_the_posterior_variance_in_any_batches(trained):
    """The compiled forward pass and numpy's variance against the Keras model run eagerly
    on all rows at once and phi Sigma phi^T in float64: equal up to float32 rounding (other
    kernels and batch sizes sum in other orders), not bit-exact."""
    heads, (x, _, _) = trained
    model = heads[True]
    logits, variance = model.outputs(x, batch_size=7)
    xs = ((x - model.mean) / model.std).astype(np.float32)
    numpy = classify._keras().ops.convert_to_numpy
    eager, phi = (numpy(v).astype(np.float64) for v in model.model(xs, training=False))
    gp = classify._gp_layer(model.model)
    reference = np.einsum("ij,jk,ik->i", phi, numpy(gp.covariance).astype(np.float64), phi)
    np.testing.assert_allclose(logits, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variance, reference, rtol=1e-4, atol=1e-7)
    assert np.array_equal(model.outputs(x, batch_size=7)[1], variance)  # reruns: bit-exact


def test_sngp_detects_out_of_distribution_nodes_and_the_plain_head_does_not(trained):
    heads, (x, y, _) = trained
    ood = np.isin(y, ["c", "d"])
    auroc = {sngp: classify.auroc(model.predict(x)[1], ood) for sngp, model in heads.items()}
    assert auroc[True] >= 0.9
    assert auroc[True] > auroc[False] + 0.2


def test_uncertainty_formulas():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [50.0, 49.0, -3.0]])
    variance = np.array([0.0, 4.0, 1.0])
    expected = logits / np.sqrt(1 + np.pi / 8 * variance)[:, None]
    adjusted = classify.mean_field_logits(logits, variance)
    np.testing.assert_allclose(adjusted, expected, rtol=1e-12)
    np.testing.assert_allclose(classify.dempster_shafer(logits),
                               3 / (3 + np.exp(logits).sum(axis=1)), rtol=1e-12)
    probabilities = classify.softmax(logits)
    np.testing.assert_allclose(probabilities, np.exp(logits) / np.exp(logits).sum(1)[:, None],
                               rtol=1e-12)
    assert classify.dempster_shafer(np.array([[1000.0, 0.0]]))[0] == pytest.approx(0.0)


def test_held_out_segments_and_class_weights():
    segments = np.repeat(np.arange(1, 13, dtype=np.uint64), 7)
    labels = np.repeat(["a", "b", "c"], 28)
    held = classify.held_out(labels, segments, 0.25, seed=5)
    assert len(np.unique(segments[held])) == 3  # a quarter of 12 segments, whole
    assert sorted(set(labels[held])) == ["a", "b", "c"]  # stratified by class
    assert not set(segments[held]) & set(segments[~held])
    np.testing.assert_array_equal(held, classify.held_out(labels, segments, 0.25, seed=5))
    y = np.array([0] * 30 + [1] * 10 + [2] * 60)
    weights = classify.class_weights(y, 3)
    totals = [weights[k] * (y == k).sum() for k in range(3)]
    np.testing.assert_allclose(totals, [100 / 3] * 3)


def test_save_and_load_give_the_same_predictions(trained, tmp_path):
    heads, (x, _, _) = trained
    model = heads[True]
    path = str(tmp_path / "classifier")
    model.save(path)
    meta = json.loads((tmp_path / "classifier" / classify.META_NAME).read_text())
    assert meta["classes"] == ["a", "b"] and meta["embedding_dim"] == DIM
    assert meta["config"]["sngp"] is True and len(meta["standardization"]["mean"]) == DIM
    assert {"epochs", "best_epoch", "val_loss", "val_balanced_accuracy"} <= set(meta["metrics"])
    loaded = classify.load(path)
    # Same weights, same inputs, same batches: the same arithmetic, bit for bit.
    for a, b in zip(model.predict(x), loaded.predict(x)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError, match="already holds a classifier"):
        model.save(path)


def test_bad_training_input_is_named():
    (x, y, g), _ = _clusters()
    with pytest.raises(ValueError, match=r"labels \['z'\] are not among the classes"):
        classify.train(x, np.where(y == "a", "z", y), g, FAST, classes=("a", "b"))
    with pytest.raises(ValueError, match=r"folds: need 2 <= folds <= labelled segments \(1\)"):
        classify.train(x, y, np.ones(len(x), np.uint64), FAST)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        classify.train(bad, y, g, FAST)
    with pytest.raises(ConfigError, match="validation_fraction: must be in"):
        classify.train(x, y, g, dataclasses.replace(FAST, validation_fraction=1.0))
