"""The synthetic dataset: morphology, ids, EM, determinism, and what lands on disk."""

from __future__ import annotations

import json
from pathlib import Path

import cc3d
import edt
import fastremap
import numpy as np
import pytest
import scipy.ndimage as ndi

from segclr_beam import cli, synth
from segclr_beam.volume import open_volume, open_volumes

SHAPE = (160, 160, 96)
SEED = 3


# Neuropil in cortex: axons 35-45% of the volume, dendrites 30-40%, glia 10-15%.
FRACTIONS = {"axon": (0.35, 0.45), "dendrite": (0.30, 0.40), "glia": (0.10, 0.15)}


@pytest.fixture(scope="module")
def generated() -> tuple[np.ndarray, dict[int, str], np.ndarray, np.ndarray]:
    """The small volume: labels, classes, EM, the generator's compartment codes."""
    labels, classes, _, codes = synth._generate(SHAPE, SEED)
    return labels, classes, synth.make_em(labels, codes, SEED), codes


@pytest.fixture(scope="module")
def default_size() -> tuple[np.ndarray, dict[int, str], np.ndarray]:
    """The default volume of the default seed: labels, classes, compartments. (Determinism
    is shown on the small volume: the same code paints both.)"""
    labels, classes, _, codes = synth._generate(synth.DEFAULT_SHAPE, 0)
    return labels, classes, synth.public_compartments(codes)


def _fractions(labels: np.ndarray, classes: dict[int, str]) -> dict[str, float]:
    ids, counts = np.unique(labels, return_counts=True)
    fractions = dict.fromkeys(synth.CLASSES, 0.0)
    for i, n in zip(ids.tolist(), counts.tolist()):
        if i:
            fractions[classes[i]] += n / labels.size
    return fractions


def test_default_volume_is_neuropil_like(default_size):
    labels, classes, _ = default_size
    fractions = _fractions(labels, classes)
    for kind, (low, high) in FRACTIONS.items():
        assert low <= fractions[kind] <= high, (kind, fractions)
    rest = 1 - sum(fractions[k] for k in FRACTIONS)  # somata and extracellular space
    assert 0.05 <= rest <= 0.25 and 0.03 <= (labels == 0).mean() <= 0.1, fractions
    kinds = list(classes.values())
    assert kinds.count("soma") >= 5 and kinds.count("glia") >= 5
    assert kinds.count("dendrite") >= 20 and kinds.count("axon") >= 100


def test_default_volume_segments_are_6_connected(default_size):
    labels, classes, _ = default_size
    pieces, n = cc3d.connected_components(labels, connectivity=6, return_N=True)
    assert n == len(classes)
    assert np.bincount(pieces.ravel())[1:].min() >= synth.MIN_SEGMENT_VOXELS


def test_compartments_agree_with_segment_classes(default_size):
    labels, classes, compartments = default_size
    assert compartments.dtype == np.uint8 and compartments.shape == labels.shape
    np.testing.assert_array_equal(compartments == 0, labels == 0)
    small, remap = fastremap.renumber(labels, in_place=False)  # remap: segment id -> small id
    ids = {v: k for k, v in remap.items()}
    keys = np.unique(small.astype(np.int64) * 8 + compartments)  # codes are below 8
    held: dict[int, set[int]] = {}
    for key in keys.tolist():
        if key >= 8:
            held.setdefault(int(ids[key // 8]), set()).add(key % 8)
    for segment_id, codes in held.items():
        assert codes <= synth.CLASS_COMPARTMENTS[classes[segment_id]], (classes[segment_id], codes)
    by_class = {kind: set().union(*(held[i] for i in held if classes[i] == kind))
                for kind in synth.CLASSES}
    assert by_class["dendrite"] == {synth.SHAFT, synth.SPINE}
    assert {synth.SOMA, synth.SHAFT} <= by_class["soma"]
    counts = np.bincount(compartments.ravel(), minlength=len(synth.COMPARTMENTS) + 1)
    assert 0.01 < counts[synth.SPINE] / counts[[synth.SHAFT, synth.SPINE]].sum() < 0.3


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> synth.Dataset:
    return synth.write_dataset(tmp_path_factory.mktemp("synth") / "data", shape=SHAPE, seed=SEED)


def test_every_class_present(generated):
    labels, classes, _, _ = generated
    assert set(classes.values()) == set(synth.CLASSES)
    assert labels.shape == SHAPE


def test_ids_are_unique_nonzero_64_bit(generated):
    labels, classes, _, _ = generated
    assert labels.dtype == np.uint64
    present = set(np.unique(labels).tolist()) - {0}
    assert present == set(classes)
    assert 0 not in classes
    assert max(classes) > 2 ** 63 and min(classes) < 2 ** 63  # spread over the whole range


def test_dense_foreground(generated):
    labels, _, _, _ = generated
    assert (labels != 0).mean() > 0.5


def test_each_segment_is_one_large_connected_component(generated):
    labels, classes, _, _ = generated
    pieces, n = cc3d.connected_components(labels, connectivity=6, return_N=True)
    assert n == len(classes)
    sizes = np.bincount(pieces.ravel())[1:]
    assert sizes.min() >= synth.MIN_SEGMENT_VOXELS


def test_classes_differ_in_thickness(generated):
    """Largest inscribed radius per segment: axons thin, dendrites thicker, somata large."""
    labels, classes, _, _ = generated
    depth = ndi.distance_transform_edt(~synth.boundaries(labels))
    ids = np.array(sorted(classes), dtype=np.uint64)
    radius = dict(zip(ids.tolist(), ndi.maximum(depth, labels, ids)))
    by_class = {c: [radius[i] for i in classes if classes[i] == c] for c in synth.CLASSES}
    assert np.median(by_class["axon"]) <= 6.5
    assert np.median(by_class["dendrite"]) >= np.median(by_class["axon"]) + 1.5
    assert np.median(by_class["glia"]) > np.median(by_class["axon"])  # a cell body
    assert min(by_class["soma"]) >= 15


def test_somata_have_proximal_neurites(default_size):
    """A soma's own dendrites are thicker than the dendrites passing by and a smaller share
    of them is spine; its axon (an initial segment) is thicker than the axons passing by."""
    labels, classes, compartments = default_size
    depth = edt.edt(labels, black_border=False, parallel=2).ravel()  # kimimaro's EDT
    small, remap = fastremap.renumber(labels, in_place=False)  # remap: segment id -> small id
    for code, passing, own_thicker in ((synth.SHAFT, "dendrite", 1.5), (synth.AXON, "axon", 1.0)):
        # The largest inscribed radius of each segment's voxels of this compartment.
        here = compartments.ravel() == code
        radius = np.zeros(len(remap) + 1)
        np.maximum.at(radius, small.ravel()[here], depth[here])
        own, other = ([radius[remap[i]] for i in classes if classes[i] == kind
                       and radius[remap[i]] > 0] for kind in ("soma", passing))
        assert np.median(own) >= np.median(other) + own_thicker, (code, own, np.median(other))
    somata = np.isin(labels, [i for i, c in classes.items() if c == "soma"])
    spines = [np.count_nonzero(compartments[m] == synth.SPINE)
              / np.count_nonzero(np.isin(compartments[m], [synth.SHAFT, synth.SPINE]))
              for m in (somata, ~somata)]
    assert 0 < spines[0] < 0.9 * spines[1], spines  # spineless near the body


def test_em_shows_each_compartment(generated):
    """Boutons are darker than the rest of the axon (vesicles), glia paler than dendrites
    (each segment's own grey varies by up to 23 levels), and a cell body's nucleus paler than
    the cytoplasm around it."""
    labels, _, em, codes = generated
    interior = ~synth.boundaries(labels) & (labels != 0)
    grey = {code: em[interior & (codes == code)].mean() for code in range(1, synth._BOUTON + 1)}
    assert grey[synth._BOUTON] < grey[synth.AXON] - 10, grey
    assert grey[synth.GLIA] > grey[synth.SHAFT], grey
    nucleus, envelope, nucleolus = synth._nuclei(labels, codes)
    body = interior & (codes == synth.SOMA)
    nucleoplasm = body & nucleus & ~envelope & ~nucleolus
    assert em[nucleoplasm].mean() > em[body & ~nucleus].mean() + 10
    assert em[body & envelope].mean() < em[nucleoplasm].mean() - 20


def test_em_is_darker_on_membranes(generated):
    labels, _, em, _ = generated
    assert em.dtype == np.uint8 and em.shape == labels.shape
    membrane = synth.boundaries(labels) & (labels != 0)
    interior = ~synth.boundaries(labels) & (labels != 0)
    assert em[membrane].mean() < em[interior].mean() - 20
    assert em.std() > 10  # texture and noise, not flat regions


def test_deterministic_for_a_seed(generated):
    labels, classes, em, codes = generated
    again, again_classes, _, again_codes = synth._generate(SHAPE, SEED)
    np.testing.assert_array_equal(labels, again)
    assert classes == again_classes
    np.testing.assert_array_equal(codes, again_codes)
    np.testing.assert_array_equal(em, synth.make_em(again, again_codes, SEED))
    other, _ = synth.make_labels(SHAPE, SEED + 1)
    assert not np.array_equal(labels != 0, other != 0)


def test_round_trip_through_volume_reader(generated, written):
    labels, classes, em, codes = generated
    assert written.classes == classes and written.shape == SHAPE and written.seed == SEED
    em_volume, segmentation = open_volumes(written.em, written.segmentation)
    assert segmentation.bounds.shape == SHAPE and em_volume.bounds.shape == SHAPE
    np.testing.assert_array_equal(segmentation.read(segmentation.bounds), labels)
    stored = open_volume(written.compartments, "compartments", synth.RESOLUTION)
    np.testing.assert_array_equal(stored.read(stored.bounds), synth.public_compartments(codes))
    stored = em_volume.read(em_volume.bounds).astype(np.int16)
    assert np.abs(stored - em).mean() < 4  # jpeg is lossy


def test_raw_em_is_exact(generated, tmp_path):
    _, _, em, _ = generated
    dataset = synth.write_dataset(tmp_path / "raw", shape=SHAPE, seed=SEED, em_encoding="raw")
    em_volume, _ = open_volumes(dataset.em, dataset.segmentation)
    np.testing.assert_array_equal(em_volume.read(em_volume.bounds), em)


def test_files_on_disk(written):
    root = Path(written.root)
    meta = json.loads((root / synth.CLASSES_FILE).read_text())
    assert all(k == str(int(k)) for k in meta["classes"])  # decimal strings keep 64 bits
    assert {int(k): v for k, v in meta["classes"].items()} == written.classes
    assert {int(k): v for k, v in meta["compartments"].items()} == dict(
        enumerate(synth.COMPARTMENTS, start=1))
    for name, encoding in (("em", "jpeg"), ("segmentation", "compressed_segmentation"),
                           ("compartments", "raw")):
        scale = json.loads((root / name / "info").read_text())["scales"][0]
        assert scale["encoding"] == encoding
        assert scale["chunk_sizes"] == [list(synth.CHUNK_SIZE)]
        assert scale["resolution"] == list(synth.RESOLUTION)
        assert scale["voxel_offset"] == [0, 0, 0]
    assert synth.load_dataset(root) == written


def test_rewrite_is_byte_identical_and_leaves_nothing_behind(written):
    root = Path(written.root)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    synth.write_dataset(root, shape=SHAPE, seed=SEED)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert before == after
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        synth.write_dataset(tmp_path / "a", shape=(160, 160, 8))
    with pytest.raises(ValueError, match="em_encoding"):
        synth.write_dataset(tmp_path / "a", shape=SHAPE, em_encoding="png")
    with pytest.raises(ValueError, match="seed"):
        synth.write_dataset(tmp_path / "a", shape=SHAPE, seed=-1)
    with pytest.raises(ValueError, match="local directory"):
        synth.write_dataset("gs://bucket/synthetic", shape=SHAPE)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious"):
        synth.write_dataset(precious, shape=SHAPE)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    with pytest.raises(FileNotFoundError, match="classes.json"):
        synth.load_dataset(precious)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_failed_write_leaves_earlier_dataset_and_no_partial_files(tmp_path, monkeypatch):
    earlier = synth.write_dataset(tmp_path / "data", shape=(96, 96, 64), seed=0)
    files = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real_write = synth._write_volume

    def fail_after_writing(path, *args):
        real_write(path, *args).result()
        raise OSError("disk full")

    monkeypatch.setattr(synth, "_write_volume", fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        synth.write_dataset(tmp_path / "data", shape=(96, 96, 64), seed=1)
    with pytest.raises(OSError, match="disk full"):
        synth.write_dataset(tmp_path / "fresh", shape=(96, 96, 64), seed=1)
    assert files == {p.relative_to(tmp_path): p.read_bytes()
                     for p in tmp_path.rglob("*") if p.is_file()}
    assert synth.load_dataset(tmp_path / "data") == earlier


def test_summary(written):
    text = synth.summarize(written)
    for word in (*synth.CLASSES, "fraction", "foreground fraction", "bytes on disk", "jpeg",
                 "compressed_segmentation", "compartments"):
        assert word in text


def test_cli(tmp_path, capsys):
    cli.main(["synth", "--out", str(tmp_path / "cli"), "--shape", "96,96,64", "--seed", "1"])
    out = capsys.readouterr().out
    assert "foreground fraction" in out
    assert synth.load_dataset(tmp_path / "cli").shape == (96, 96, 64)


def test_conftest_dataset(synthetic_dataset):
    assert set(synthetic_dataset.classes.values()) == set(synth.CLASSES)
    assert Path(synthetic_dataset.em, "info").is_file()
