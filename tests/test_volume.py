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


# ---------------------------------------------------------------- volumes cloud-volume writes

CV_OFFSET, CV_CHUNK = (5, 7, 3), (32, 32, 16)  # unlike the project's 64^3 chunks at the origin


def write_with_cloudvolume(url, array, encoding, offset=CV_OFFSET, compress=None):
    """`array` ([x, y, z]) written by cloud-volume as igneous does: its defaults (chunk files
    gzip-compressed on local disk) unless `compress` says otherwise."""
    from cloudvolume import CloudVolume

    segmentation = np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="segmentation" if segmentation else "image",
        data_type=array.dtype.name, encoding=encoding, resolution=[32, 32, 33],
        voxel_offset=list(offset), volume_size=list(array.shape), chunk_size=list(CV_CHUNK))
    options = {} if compress is None else {"compress": compress}
    volume = CloudVolume(url, info=info, progress=False, **options)
    volume.commit_info()
    volume[tuple(slice(o, o + n) for o, n in zip(offset, array.shape))] = array
    return url


def smooth_em(shape, seed=0):
    """EM-like uint8 (smooth with noise), so that jpeg keeps it close."""
    rng = np.random.default_rng(seed)
    ramp = np.indices(shape).sum(axis=0) / 5.0
    return (128 + 60 * np.sin(ramp) + rng.normal(0, 5, shape)).clip(0, 255).astype(np.uint8)


def block_labels(shape, seed=0, dtype=np.uint64):
    """Segment-like labels: boxes of a few ids (one above 2^63) and background."""
    rng = np.random.default_rng(seed)
    ids = np.array([0, 7, 12345, 2**40 + 3, 2**63 + 11], dtype=np.uint64).astype(dtype)
    coarse = ids[rng.integers(0, len(ids), tuple(-(-n // 4) for n in shape))]
    return np.repeat(np.repeat(np.repeat(coarse, 4, 0), 4, 1), 4, 2)[
        :shape[0], :shape[1], :shape[2]]


CV_CASES = [  # encoding, data, how cloud-volume stores it, which reader the project picks
    ("raw", "em", None, "cloud-volume"),  # NAME.gz chunk files
    ("raw", "em", False, "tensorstore"),
    ("jpeg", "em", None, "tensorstore"),  # cloud-volume never gzips jpeg chunks
    ("compressed_segmentation", "seg", None, "cloud-volume"),
    ("compressed_segmentation", "seg", False, "tensorstore"),
    ("compresso", "seg", None, "cloud-volume"),
    ("crackle", "seg", None, "cloud-volume"),
    ("crackle", "seg32", False, "cloud-volume"),
]


@pytest.mark.parametrize("encoding, data, compress, reader", CV_CASES)
def test_volumes_written_by_cloudvolume_read_like_our_own(tmp_path, encoding, data, compress,
                                                         reader):
    from cloudvolume import CloudVolume

    shape = (70, 50, 40)
    array = {"em": smooth_em, "seg": block_labels,
             "seg32": lambda s: block_labels(s, dtype=np.uint32)}[data](shape)
    url = write_with_cloudvolume(f"file://{tmp_path}/cv", array, encoding, compress=compress)
    ours = write_precomputed(tmp_path / "ours", array, offset=CV_OFFSET)
    volume, reference = open_volume(str(tmp_path / "cv"), "v"), open_volume(ours, "v")
    assert volume.reader == reader and reader in volume.describe()
    assert (volume.bounds, volume.dtype) == (reference.bounds, reference.dtype)
    assert volume.chunks == (CV_CHUNK, CV_OFFSET)
    # A box across the volume's lower corner and chunk boundaries, and one beyond it.
    for box in (Box((0, 0, 0), (40, 41, 22)), Box((60, 30, 30), (90, 60, 50)),
                Box((100, 0, 0), (110, 10, 10))):
        got = volume.read(box)
        assert got.dtype == array.dtype
        if encoding == "jpeg":  # lossy: the same decode as cloud-volume's, close to the array
            inside = box.intersect(volume.bounds)
            expected = reference.read(box)
            if not inside.is_empty():
                x, y, z = (slice(a, b) for a, b in zip(inside.start, inside.stop))
                decoded = np.asarray(CloudVolume(url, progress=False)[x, y, z])[..., 0]
                np.testing.assert_array_equal(got[inside.slices(box.start)], decoded)
                assert np.abs(decoded.astype(int) - expected[inside.slices(box.start)]).mean() < 6
            assert not got[expected == 0].any()  # zeros exactly outside the volume
        else:
            np.testing.assert_array_equal(got, reference.read(box))
    assert volume.read(volume.bounds).any()
    fortran = volume.read_async(Box((5, 7, 3), (20, 20, 20)), order="F").result()
    assert fortran.flags.f_contiguous
    np.testing.assert_array_equal(fortran, volume.read(Box((5, 7, 3), (20, 20, 20))))


def test_cloudvolume_reader_pickles_as_its_spec(tmp_path):
    import pickle

    array = block_labels((40, 40, 20))
    write_with_cloudvolume(f"file://{tmp_path}/seg", array, "crackle")
    volume = open_volume(str(tmp_path / "seg"), "segmentation")
    volume.read(volume.bounds)
    copy = pickle.loads(pickle.dumps(volume))
    assert copy._store is None and copy.reader == "cloud-volume"
    np.testing.assert_array_equal(copy.read(copy.bounds), array)


def test_cloudvolume_volumes_on_gcs(tmp_path, gcs):
    """cloud-volume writes through the emulator (google-cloud-storage follows
    STORAGE_EMULATOR_HOST): crackle is read by cloud-volume, gzip'd raw chunks (stored with
    Content-Encoding: gzip) by TensorStore."""
    em, labels = smooth_em((70, 50, 40)), block_labels((70, 50, 40))
    for name, array, encoding, reader in (("em", em, "raw", "tensorstore"),
                                          ("seg", labels, "crackle", "cloud-volume")):
        url = write_with_cloudvolume(f"gs://{gcs.bucket}/cloudvolume/{name}", array, encoding)
        volume = open_volume(url, name)
        assert volume.reader == reader
        np.testing.assert_array_equal(volume.read(volume.bounds), array)


def test_job_on_volumes_written_by_cloudvolume(synthetic_dataset, small_model, tmp_path):
    """The synthetic dataset copied by cloud-volume (raw EM, crackle segmentation, gzip chunk
    files, a voxel offset, 32 x 32 x 16 chunks) gives the same points, shifted by the offset,
    and the same embeddings: the cutouts are equal, only their batches differ."""
    from segclr_beam import job, pipeline, points, synth
    from segclr_beam.config import EmbedConfig
    from segclr_beam.reader import EmbeddingReader
    from tolerance import assert_embeddings_close

    offset = np.array((37, 21, 9))
    bbox = np.array((0, 0, 0, 64, 64, 64))
    copied = Box((0, 0, 0), (96, 96, 96))  # the box and the cutouts' reach beyond it
    sources = {}
    for name, source, encoding in (("em", synthetic_dataset.em, "raw"),
                                   ("segmentation", synthetic_dataset.segmentation, "crackle")):
        volume = open_volume(source, name, synth.RESOLUTION)
        url = write_with_cloudvolume(f"file://{tmp_path}/{name}", volume.read(copied), encoding,
                                     offset=tuple(offset))
        assert open_volume(url[len("file://"):], name, synth.RESOLUTION).reader == "cloud-volume"
        sources[name] = url[len("file://"):]

    def run(em, segmentation, box, out):
        pipeline.run(EmbedConfig(em=em, segmentation=segmentation, model=small_model,
                                 output=str(out), resolution=synth.RESOLUTION,
                                 bbox=tuple(int(v) for v in box), chunk_size=64, block_size=64,
                                 cutout_size=33, batch_size=8, num_shards=4, bytewidth=8,
                                 formats=("csv_zip",)))
        return out

    ours = run(synthetic_dataset.em, synthetic_dataset.segmentation, bbox, tmp_path / "ours")
    theirs = run(sources["em"], sources["segmentation"], bbox + np.tile(offset, 2),
                 tmp_path / "theirs")
    expected = points.read_points(str(ours / job.POINTS_FILE))
    found = points.read_points(str(theirs / job.POINTS_FILE))
    assert len(expected) > 10 and len({p.segment_id for p in expected}) > 1
    assert found == [p._replace(x=p.x + offset[0], y=p.y + offset[1], z=p.z + offset[2])
                     for p in expected]
    for variant in ("raw", "agg10um", "agg25um"):
        reference = {s.segment_id: s for s in EmbeddingReader(str(ours / variant))}
        segments = {s.segment_id: s for s in EmbeddingReader(str(theirs / variant))}
        assert sorted(segments) == sorted(reference)
        for segment_id, segment in segments.items():
            np.testing.assert_array_equal(segment.node_ids, reference[segment_id].node_ids)
            np.testing.assert_array_equal(segment.xyz, reference[segment_id].xyz + offset)
            assert_embeddings_close(segment.embeddings, reference[segment_id].embeddings,
                                    f"{variant} segment {segment_id}")
