"""Volume access: scale choice, reads past the edge, gs:// parity, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorstore as ts

from segclr_beam.volume import Box, VolumeError, open_volume, open_volumes


def write_precomputed(path, array, resolution=(32, 32, 33), offset=(0, 0, 0), extra_scales=()):
    """A small neuroglancer precomputed volume holding `array` ([x, y, z])."""
    segmentation = array.dtype == np.uint64
    base = {"driver": "neuroglancer_precomputed", "kvstore": f"file://{path}/",
            "multiscale_metadata": {"type": "segmentation" if segmentation else "image",
                                    "data_type": array.dtype.name, "num_channels": 1}}
    for res in extra_scales:
        ts.open({**base, "scale_metadata": {"size": [8, 8, 8], "resolution": list(res),
                                            "encoding": "raw", "chunk_size": [8, 8, 8]},
                 "create": True}).result()
    scale = {"size": list(array.shape), "resolution": list(resolution), "voxel_offset": list(offset),
             "encoding": "compressed_segmentation" if segmentation else "raw",
             "chunk_size": [16, 16, 16]}
    store = ts.open({**base, "scale_metadata": scale, "create": True}).result()
    store[..., 0].write(array).result()
    return str(path)


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    em = rng.integers(1, 255, (40, 30, 20), dtype=np.uint8)
    seg = rng.integers(1, 2**64 - 1, (40, 30, 20), dtype=np.uint64)
    write_precomputed(tmp_path / "em", em, offset=(5, 0, 0), extra_scales=[(64, 64, 66)])
    write_precomputed(tmp_path / "seg", seg, offset=(5, 0, 0))
    return tmp_path / "em", tmp_path / "seg", em, seg


def test_box_outside_the_volume_reads_zeros(pair):
    em_path, seg_path, em_array, seg_array = pair
    em, seg = open_volumes(str(em_path), str(seg_path))
    assert em.bounds == Box((5, 0, 0), (45, 30, 20))
    box = Box((-3, 20, 15), (12, 35, 25))
    direct = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{seg_path}/"}).result()
    got = seg.read(box)
    assert got.shape == (15, 15, 10)
    inside = np.asarray(direct[5:12, 20:30, 15:20, 0].read().result())
    np.testing.assert_array_equal(got[8:, :10, :5], inside)
    np.testing.assert_array_equal(inside, seg_array[:7, 20:30, 15:20])
    outside = np.ones(got.shape, bool)
    outside[8:, :10, :5] = False
    assert not got[outside].any()
    assert not em.read(Box((100, 100, 100), (110, 110, 110))).any()


def test_scale_is_chosen_by_resolution(pair):
    em_path, *_ = pair
    coarse = open_volume(str(em_path), "EM", (64, 64, 66))
    assert coarse.bounds.shape == (8, 8, 8)
    fine = open_volume(f"precomputed://{em_path}", "EM")
    assert fine.bounds.shape == (40, 30, 20)


def test_spec_forms_agree(pair, tmp_path):
    em_path, _, em_array, _ = pair
    spec = {"driver": "neuroglancer_precomputed", "kvstore": f"file://{em_path}/"}
    spec_file = tmp_path / "em.json"
    spec_file.write_text(json.dumps(spec))
    box = Box((5, 0, 0), (15, 10, 10))
    for source in (spec, json.dumps(spec), str(spec_file), str(em_path)):
        np.testing.assert_array_equal(open_volume(source, "EM").read(box), em_array[:10, :10, :10])


def test_zarr_with_labelled_axes(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)  # stored z, y, x
    ts.open({"driver": "zarr", "kvstore": f"file://{tmp_path}/z/", "create": True,
             "metadata": {"shape": [4, 5, 6], "dtype": "|u1"},
             "transform": {"input_labels": ["z", "y", "x"]}}).result().write(array).result()
    spec = {"driver": "zarr", "kvstore": f"file://{tmp_path}/z/",
            "transform": {"input_labels": ["z", "y", "x"]}}
    volume = open_volume(spec, "EM")
    assert volume.bounds.shape == (6, 5, 4)
    np.testing.assert_array_equal(volume.read(volume.bounds), array.transpose(2, 1, 0))


def test_gcs_copy_reads_the_same(pair, gcs):
    em_path, seg_path, *_ = pair
    url = gcs.upload_dir(seg_path, "volumes/seg")
    box = Box((0, 10, 5), (30, 40, 15))
    remote = open_volume(url, "segmentation")
    local = open_volume(str(seg_path), "segmentation")
    np.testing.assert_array_equal(remote.read(box), local.read(box))
    assert remote.read(box).any()


def test_missing_volume(tmp_path):
    with pytest.raises(VolumeError, match=r"EM: .*no volume at .*nothing"):
        open_volume(str(tmp_path / "nothing"), "EM")


def test_em_of_wrong_dtype(tmp_path, pair):
    _, seg_path, *_ = pair
    write_precomputed(tmp_path / "em16", np.ones((8, 8, 8), np.uint16))
    with pytest.raises(VolumeError, match="EM: dtype must be uint8, found uint16"):
        open_volumes(str(tmp_path / "em16"), str(seg_path))


def test_resolution_neither_volume_has(pair):
    em_path, seg_path, *_ = pair
    with pytest.raises(VolumeError, match=r"EM: no scale at resolution 8 x 8 x 8 nm; it has 64"):
        open_volumes(str(em_path), str(seg_path), (8, 8, 8))


def test_bounds_that_do_not_overlap(tmp_path, pair):
    em_path, *_ = pair
    write_precomputed(tmp_path / "far", np.ones((8, 8, 8), np.uint64), offset=(1000, 0, 0))
    with pytest.raises(VolumeError, match="do not overlap"):
        open_volumes(str(em_path), str(tmp_path / "far"))


@pytest.mark.parametrize("source, message", [
    ('{"driver": "zarr", ', "malformed TensorStore spec"),
    ({"kvstore": "file:///tmp/x/"}, "no 'driver'"),
    ({"driver": "no-such-driver", "kvstore": "file:///tmp/x/"}, "cannot open"),
])
def test_malformed_spec(source, message):
    with pytest.raises(VolumeError, match=message):
        open_volume(source, "segmentation")
