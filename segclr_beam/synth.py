"""A synthetic EM volume and its dense segmentation, for the demo, the tests and the benchmarks.

The labels imitate a segmentation of cortical neuropil at 32 x 32 x 33 nm: thin axons with
boutons, thicker spiny dendrites that branch, somata (often cut by the volume's faces) with
their proximal neurites (thick dendrites, spineless near the body, and a smooth axon initial
segment), and glia with a small body and winding, varicose processes. The
cells are then grown into the space left until they press against each other, as in fixed
neuropil, so the volume fractions are near cortex's: axons about 40%, dendrites about 35%,
glia 10-15%, somata and extracellular space the rest. At the default size that is about
600-950 axons, 170-190 dendrites, 6 somata and 12 glia. Each segment is one 6-connected
component with a random 64-bit id, and every voxel also carries a compartment label (axon,
dendrite shaft, spine, soma, glia; the `compartments` volume) for training classifiers.

The EM is drawn from the labels and compartments (dark membranes, textured cytoplasm, and the
ultrastructure by which people tell the compartments apart: mitochondria, vesicle-filled
boutons, pale glia, a soma's nucleus), so a model
sees the same kind of signal it sees in real data. Everything is
deterministic for a seed, and written as neuroglancer precomputed volumes with TensorStore.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import cc3d
import fastremap
import numpy as np
import scipy.ndimage as ndi
import tensorstore as ts

# What a seed makes changes with the generator: caches of synthetic data carry this number.
VERSION = 2
DEFAULT_SHAPE = (384, 384, 256)
RESOLUTION = (32.0, 32.0, 33.0)
CLASSES = ("axon", "dendrite", "soma", "glia")
# Per-voxel compartments: code i + 1 is COMPARTMENTS[i]; 0 is extracellular space.
COMPARTMENTS = ("axon", "shaft", "spine", "soma", "glia")
AXON, SHAFT, SPINE, SOMA, GLIA = range(1, len(COMPARTMENTS) + 1)
# A code the generator gives an axon's boutons, so that the EM can fill them with vesicles;
# the compartments volume calls them axon.
_BOUTON = len(COMPARTMENTS) + 1
# The compartments a segment of each class may hold.
CLASS_COMPARTMENTS = {"axon": {AXON}, "dendrite": {SHAFT, SPINE},
                      "soma": {SOMA, SHAFT, SPINE, AXON}, "glia": {GLIA}}
CHUNK_SIZE = (64, 64, 64)
MIN_SHAPE = 64
# Pieces smaller than this are dropped: too small to skeletonize or embed meaningfully.
MIN_SEGMENT_VOXELS = 1000
CLASSES_FILE = "classes.json"
VOLUMES = ("em", "segmentation", "compartments")
EM_ENCODINGS = ("jpeg", "raw")

# Distance in voxels between the centres of the balls that paint a tube.
_SPACING = 0.5
# Independent random streams, so that e.g. a change in the EM model leaves the labels alone.
_GEOMETRY, _IDS, _EM = 1, 2, 3
# Fractions of the volume painted as neurite tubes before they grow into the space left
# (see _grow); tuned so that axons and dendrites keep distinct widths once grown.
_TUBE_FRACTION = {"dendrite": 0.13, "axon": 0.12}
# The shares of the volume the neurites grow to (a soma's share includes its neurites), the
# extracellular space left when they stop, and how many layers they grow at most (spines: 1).
_SHARES = {"axon": 0.38, "dendrite": 0.34, "soma": 0.09, "glia": 0.13}
_SPACE, _MAX_GROWTH, _SPINE_GROWTH = 0.06, 24, 1
# Radii (voxels) the neurites and somata are drawn with before they grow.
_AXON_RADIUS, _DENDRITE_RADIUS, _SOMA_RADIUS = (2.0, 3.0), (5.0, 7.0), (45.0, 70.0)
_GLIA_RADIUS, _GLIA_PROCESS_RADIUS = (16.0, 22.0), (5.0, 8.0)
# A soma's own neurites: dendrites start thick and taper (voxels of radius per voxel of
# length) with no spines over their first voxels, and the axon's initial segment is smooth.
_PROXIMAL_DENDRITE_RADIUS, _PROXIMAL_TAPER, _SPINE_FREE = (10.0, 13.0), 0.02, 60.0
_INITIAL_SEGMENT_RADIUS = (3.0, 4.0)
# Segments per class and per default volume; smaller volumes get proportionally fewer.
_SOMATA, _GLIA = 6, 12
# A class stops receiving segments after this many attempts in a row that got nowhere.
_MAX_FAILURES = 20
# Places tried for a new neurite to start before it starts from a blocked one (and fails).
_START_TRIES = 20
# The 6-neighbourhood.
_CROSS = ndi.generate_binary_structure(3, 1)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A synthetic dataset on disk: EM, segmentation and compartment volumes, segment classes."""

    root: str
    em: str
    segmentation: str
    compartments: str
    classes: dict[int, str]
    shape: tuple[int, int, int]
    seed: int


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt((v * v).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _ball(radius: float) -> np.ndarray:
    """Integer offsets (n, 3) of the voxels within `radius` of a voxel centre."""
    r = int(np.ceil(radius))
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return grid[(grid ** 2).sum(1) <= radius ** 2 + 1e-6]


def _quantize(radius: np.ndarray) -> np.ndarray:
    """Radii rounded to half voxels, so that a few cached balls paint every tube."""
    return np.round(np.asarray(radius) * 2) / 2


class _Canvas:
    """The volume under construction: small local labels (0 = free), their classes, the
    compartment of every voxel and the voxels painted per class so far."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = np.array(shape)
        self.labels = np.zeros(shape, dtype=np.uint32)
        self.compartments = np.zeros(shape, dtype=np.uint8)
        self.strides = np.array([shape[1] * shape[2], shape[2], 1])
        self.kinds = [""]
        self.voxels = dict.fromkeys(CLASSES, 0)
        self._ball_offsets: dict[float, np.ndarray] = {}

    def new_segment(self, kind: str) -> int:
        self.kinds.append(kind)
        return len(self.kinds) - 1

    def long_enough(self, path: np.ndarray) -> bool:
        """Whether a neurite path is worth painting: 80 voxels, or half the volume if smaller."""
        length = np.linalg.norm(np.diff(path, axis=0), axis=1).sum()
        return length >= min(80.0, self.shape.min() / 2)

    def _offsets(self, radius: float) -> np.ndarray:
        """Flat index offsets of the voxels of a ball of `radius`."""
        if radius not in self._ball_offsets:
            self._ball_offsets[radius] = _ball(radius) @ self.strides
        return self._ball_offsets[radius]

    def _balls(self, centers: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray | None]:
        """Flat voxel indices (n, m) of balls at `centers` (n, 3), and which lie in the volume.

        The mask is None when every ball lies inside, the common case, which skips the
        per-voxel bounds check.
        """
        radius = round(2 * float(radius)) / 2  # _quantize of one radius
        at = np.rint(centers).astype(np.int64)
        reach = int(np.ceil(radius))
        if at.min() >= reach and (at.max(0) < self.shape - reach).all():
            return (at @ self.strides)[:, None] + self._offsets(radius), None
        voxels = at[:, None, :] + _ball(radius)
        inside = ((voxels >= 0) & (voxels < self.shape)).all(-1)
        return np.where(inside, voxels @ self.strides, 0), inside

    def blocked(self, centers: np.ndarray, radius: float, own: int) -> np.ndarray:
        """For each centre (n, 3): does its ball touch a segment other than `own`?"""
        flat, inside = self._balls(centers, radius)
        found = self.labels.ravel()[flat]
        hit = (found != 0) & (found != own)
        return (hit if inside is None else hit & inside).any(-1)

    def paint(self, flat: np.ndarray, label: int, compartment: int) -> None:
        """Give the free voxels among flat indices `flat` to segment `label`."""
        labels = self.labels.reshape(-1)
        free = flat[labels[flat] == 0]
        # Count each voxel once without sorting: number the entries, and an entry counts
        # if its number is the one its voxel kept (the last written).
        labels[free] = np.arange(1, len(free) + 1, dtype=labels.dtype)
        self.voxels[self.kinds[label]] += int(np.count_nonzero(
            labels[free] == np.arange(1, len(free) + 1, dtype=labels.dtype)))
        labels[free] = label
        self.compartments.reshape(-1)[free] = compartment

    def paint_tube(self, centers: np.ndarray, radii: np.ndarray, label: int,
                   compartment: int) -> None:
        """Paint balls of `radii` at `centers` into free voxels; other segments stay untouched."""
        radii = _quantize(radii)
        for radius in np.unique(radii):
            flat, inside = self._balls(centers[radii == radius], radius)
            self.paint(flat.reshape(-1) if inside is None else flat[inside], label, compartment)


def _densify(points: np.ndarray) -> np.ndarray:
    """Resample a polyline every _SPACING voxels, so painted balls overlap into a smooth tube."""
    length = np.r_[0, np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]
    s = np.arange(0, length[-1] + 1e-9, _SPACING)
    return np.stack([np.interp(s, length, points[:, i]) for i in range(3)], -1)


def _walk(canvas: _Canvas, rng: np.random.Generator, own: int, start: np.ndarray,
          heading: np.ndarray, clearance: float, step: float, max_length: float,
          persistence: float) -> np.ndarray:
    """Centerline (n, 3) of a smooth random path that steers around other segments.

    The direction drifts with a persistence length of about `persistence` voxels and is
    pulled gently back to `heading`, so paths cross the volume the way neurites do. When the
    ball of radius `clearance` ahead would touch another segment, the least bent of a few wider
    candidate directions that is free is taken. The walk ends when it leaves the volume, is
    boxed in, or reaches `max_length`. A short moving average rounds off the turns.
    """
    pos = np.asarray(start, dtype=float)
    heading = _unit(np.asarray(heading, dtype=float))
    direction = heading
    spread = np.array([np.sqrt(2 * step / persistence), 0.4, 0.4, 0.8, 0.8, 1.2, 1.6, 2.4])[:, None]
    points = [pos]
    for _ in range(int(max_length / step)):
        candidates = _unit(direction + spread * rng.standard_normal((len(spread), 3))
                           + 0.03 * heading)
        ahead = pos + step * candidates
        choice = 0
        if canvas.blocked(ahead[:1], clearance, own)[0]:
            free = np.flatnonzero(~canvas.blocked(ahead, clearance, own))
            if free.size == 0:
                break
            choice = free[0]
        pos, direction = ahead[choice], candidates[choice]
        points.append(pos)
        if ((pos < 0) | (pos > canvas.shape - 1)).any():
            break
    return ndi.uniform_filter1d(np.array(points), 5, axis=0, mode="nearest")


def _entry(rng: np.random.Generator, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A random point on a face of the volume (faces chosen by area) and an inward heading."""
    areas = np.array([shape[1] * shape[2], shape[0] * shape[2], shape[0] * shape[1]], float)
    axis = rng.choice(3, p=areas / areas.sum())
    side = rng.integers(2)
    start = rng.uniform(0.1, 0.9, 3) * (shape - 1)
    start[axis] = side * (shape[axis] - 1)
    normal = np.zeros(3)
    normal[axis] = 1.0 if side == 0 else -1.0
    return start, _unit(normal + 0.6 * rng.standard_normal(3))


def _add_axon(canvas: _Canvas, rng: np.random.Generator, label: int, start: np.ndarray,
              heading: np.ndarray, radius: float, boutons: bool = True) -> bool:
    """A thin tube with boutons (swellings) every ~40 voxels, walked from `start` both ways
    (so it may start inside the volume); False if it got nowhere. Without `boutons` it is an
    axon's initial segment: smooth."""
    bouton = 1.5
    walk = dict(clearance=radius + 1, step=3.0, max_length=2 * canvas.shape.max(),
                persistence=300)
    back = _walk(canvas, rng, label, start, -heading, **walk)
    path = np.concatenate([back[::-1], _walk(canvas, rng, label, start, heading, **walk)[1:]])
    if not canvas.long_enough(path):
        return False
    centers = _densify(path)
    s = np.arange(len(centers)) * _SPACING
    places = rng.uniform(0, s[-1], size=int(s[-1] / 40) if boutons else 0)
    swell = np.minimum(np.exp(-((s[:, None] - places[None]) / 2.5) ** 2).sum(1), 1)
    radii = radius + bouton * swell
    swollen = swell > 0.5
    canvas.paint_tube(centers[swollen], radii[swollen], label, _BOUTON)
    canvas.paint_tube(centers[~swollen], radii[~swollen], label, AXON)
    return True


def _add_spines(canvas: _Canvas, rng: np.random.Generator, label: int, centers: np.ndarray,
                radii: np.ndarray, start: float) -> None:
    """Spines every ~8 voxels along a dendrite from `start` voxels on: a thin neck ending in
    a round head."""
    step = np.diff(centers, axis=0, append=centers[-1:] + (centers[-1:] - centers[-2:-1]))
    tangents = _unit(step + 1e-9)
    positions = np.cumsum(rng.uniform(4, 12, size=int(len(centers) * _SPACING / 4))) / _SPACING
    for i in positions[positions >= start / _SPACING].astype(int):
        if i >= len(centers):
            break
        side = rng.standard_normal(3)
        side = _unit(side - side @ tangents[i] * tangents[i])
        neck_length, neck_radius = rng.uniform(3, 9), rng.choice([1.0, 1.5])
        head_radius = rng.uniform(2.0, 3.5)
        base = radii[i] - 1
        neck = centers[i] + side * np.arange(base, base + neck_length, _SPACING)[:, None]
        head = centers[i] + side * (base + neck_length + head_radius - 1)
        if (canvas.blocked(neck, neck_radius + 1, label).any()
                or canvas.blocked(head[None], head_radius + 1, label)[0]):
            continue
        canvas.paint_tube(neck, np.full(len(neck), neck_radius), label, SPINE)
        canvas.paint_tube(head[None], np.array([head_radius]), label, SPINE)


def _add_dendrite(canvas: _Canvas, rng: np.random.Generator, label: int, start: np.ndarray,
                  heading: np.ndarray, radius: float, branches: int = 1,
                  taper: float = 0.003, smooth: float = 0.0) -> bool:
    """A spiny tube tapering from `radius` by `taper` per voxel, branching up to `branches`
    times; its first `smooth` voxels carry no spines."""
    path = _walk(canvas, rng, label, start, heading, clearance=radius + 1, step=3.0,
                 max_length=3 * canvas.shape.max(), persistence=200)
    if not canvas.long_enough(path):
        return False
    centers = _densify(path)
    radii = np.maximum(radius - taper * np.arange(len(centers)) * _SPACING, 4.0)
    canvas.paint_tube(centers, radii, label, SHAFT)
    if branches and len(centers) > 120 and rng.random() < 0.6:
        at = rng.integers(len(centers) // 4, len(centers) // 2)
        tangent = _unit(centers[at + 1] - centers[at - 1])
        turn = _unit(rng.standard_normal(3))
        _add_dendrite(canvas, rng, label, centers[at], _unit(tangent + 1.2 * turn),
                      max(4.0, 0.8 * radii[at]), branches - 1, taper,
                      max(0.0, smooth - at * _SPACING))
    _add_spines(canvas, rng, label, centers, radii, smooth)
    return True


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random orthogonal matrix: an orientation for an ellipsoid."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _paint_ellipsoid(canvas: _Canvas, rng: np.random.Generator, label: int, center: np.ndarray,
                     radius: float, compartment: int) -> np.ndarray:
    """Paint a randomly oriented ellipsoid of largest semi-axis `radius`; returns its
    quadratic form (x^T form x <= 1 inside)."""
    axes = radius * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.6, 0.85)])
    rotation = _random_rotation(rng)
    form = rotation @ np.diag(1 / axes ** 2) @ rotation.T
    lo = np.clip(np.floor(center - radius).astype(int), 0, canvas.shape)
    hi = np.clip(np.ceil(center + radius).astype(int) + 1, 0, canvas.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    offset = grid - center
    inside = np.einsum("...i,ij,...j->...", offset, form, offset) <= 1
    canvas.paint((grid[inside] @ canvas.strides).astype(np.int64), label, compartment)
    return form


def _add_soma(canvas: _Canvas, rng: np.random.Generator, label: int, center: np.ndarray,
              radius: float) -> None:
    """A randomly oriented ellipsoid with 2-4 dendrites and one axon leaving it, as proximal
    neurites are: thick dendrites that taper and bear no spines near the cell body, and a
    smooth axon initial segment thicker than the axons passing by."""
    form = _paint_ellipsoid(canvas, rng, label, center, radius, SOMA)
    directions: list[np.ndarray] = []
    count = rng.integers(2, 5) + 1
    while len(directions) < count:
        u = _unit(rng.standard_normal(3))
        if all(u @ v < 0.5 for v in directions):
            directions.append(u)
    for i, u in enumerate(directions):
        start = center + u * (1 / np.sqrt(u @ form @ u) - 2)
        if ((start < 0) | (start > canvas.shape - 1)).any():
            continue  # this side of the soma lies outside the volume
        if i == 0:
            _add_axon(canvas, rng, label, start, u, radius=rng.uniform(*_INITIAL_SEGMENT_RADIUS),
                      boutons=False)
        else:
            _add_dendrite(canvas, rng, label, start, u,
                          radius=rng.uniform(*_PROXIMAL_DENDRITE_RADIUS),
                          taper=_PROXIMAL_TAPER, smooth=_SPINE_FREE)


def _inside(rng: np.random.Generator, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A random point inside the volume and a random heading."""
    return rng.uniform(0, shape - 1), _unit(rng.standard_normal(3))


def _add_neurites(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Dendrites entering through the faces, then axons passing through free places anywhere,
    until each class has its share of tubes or finds no more room."""
    total = int(np.prod(canvas.shape))
    for kind, add, radii, where in (("dendrite", _add_dendrite, _DENDRITE_RADIUS, _entry),
                                    ("axon", _add_axon, _AXON_RADIUS, _inside)):
        failures = 0
        while canvas.voxels[kind] < _TUBE_FRACTION[kind] * total and failures < _MAX_FAILURES:
            label = canvas.new_segment(kind)
            radius = rng.uniform(*radii)
            for _ in range(_START_TRIES):
                start, heading = where(rng, canvas.shape)
                if not canvas.blocked(start[None], radius + 1, label)[0]:
                    break
            made = add(canvas, rng, label, start, heading, radius=radius)
            failures = 0 if made else failures + 1


def _add_glia(canvas: _Canvas, rng: np.random.Generator, label: int, center: np.ndarray,
              radius: float) -> None:
    """A small irregular cell body with 5-8 winding, varicose processes that branch off it,
    as astrocytes and microglia look in neuropil: compact, so its skeleton stays small."""
    _paint_ellipsoid(canvas, rng, label, center, radius, GLIA)
    for _ in range(rng.integers(5, 9)):
        width = rng.uniform(*_GLIA_PROCESS_RADIUS)
        path = _walk(canvas, rng, label, center, _unit(rng.standard_normal(3)),
                     clearance=width + 1, step=3.0, max_length=1.5 * canvas.shape.max(),
                     persistence=60)
        if len(path) < 2:
            continue
        centers = _densify(path)
        s = np.arange(len(centers)) * _SPACING
        phase = rng.uniform(0, 2 * np.pi)
        radii = width * (1 + 0.35 * np.sin(s / rng.uniform(6, 12) + phase))
        canvas.paint_tube(centers, np.maximum(radii, 1.5), label, GLIA)


def _place_cells(canvas: _Canvas, rng: np.random.Generator, count: int, kind: str,
                 radii: tuple[float, float], add) -> None:
    """`count` cells of `kind` apart from each other and from what is there, each drawn by
    `add`; a cell whose centre lies near a face of the volume is cut by it, as in any EM
    volume smaller than a few cell bodies."""
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(50 * count):
        if len(placed) == count:
            break
        radius = min(rng.uniform(*radii), 0.3 * canvas.shape.min())
        center = rng.uniform(0.2 * radius, canvas.shape - 0.2 * radius)
        if (all(np.linalg.norm(center - c) > radius + r + 4 for c, r in placed)
                and not canvas.blocked(center[None], radius + 2, -1)[0]):
            placed.append((center, radius))
    for center, radius in placed:
        add(canvas, rng, canvas.new_segment(kind), center, radius)


def _grow(canvas: _Canvas, shares: dict[str, float], space: float) -> None:
    """Neurites grow into the free voxels around them, a 6-neighbour layer at a time, so that
    cells press against each other as in fixed neuropil.

    A class grows while it holds less than its share of the volume (every class, once those
    short of it find no more room), and the growth stops when only `space` of the volume is
    left free (extracellular space). Spines grow only _SPINE_GROWTH layers, so they stay
    slender. A voxel reached by several segments in one layer goes to the highest label: a
    fixed rule, so the result is deterministic.

    Only the frontier is visited: the free voxels next to a painted one, kept as a mask of
    the volume padded by one free-never voxel on every side, so neighbours are flat offsets.
    """
    total = canvas.labels.size
    kind_of = np.array([CLASSES.index(k) if k else 0 for k in canvas.kinds])
    code = np.pad(canvas.labels * np.uint32(8) + canvas.compartments, 1)  # compartments < 8
    free = np.pad(canvas.labels == 0, 1)
    frontier = free & ndi.binary_dilation(code != 0, _CROSS)
    code, free, frontier = code.reshape(-1), free.reshape(-1), frontier.reshape(-1)
    padded = canvas.shape + 2
    neighbours = np.array([1, padded[2], padded[1] * padded[2]])
    neighbours = np.concatenate([neighbours, -neighbours])
    left = int(free.sum())
    gained = np.zeros(0, dtype=code.dtype)
    compartment = np.arange(8 * len(kind_of)) % 8
    label = np.arange(8 * len(kind_of)) // 8
    for layer in range(_MAX_GROWTH):
        if left <= space * total:
            break
        growing = [CLASSES.index(k) for k, share in shares.items()
                   if canvas.voxels[k] < share * total]
        if not growing or (layer and len(gained) < 0.001 * total):
            growing = list(range(len(CLASSES)))  # the classes short of their share are stuck
        by_compartment = np.zeros(8, dtype=bool)
        by_compartment[[AXON, _BOUTON, SHAFT, SOMA, GLIA]] = True
        by_compartment[SPINE] = layer < _SPINE_GROWTH
        # grows[code]: whether a voxel holding `code` grows this layer.
        grows = by_compartment[compartment] & np.isin(kind_of, growing)[label]
        at = np.flatnonzero(frontier)
        reach = np.zeros(len(at), dtype=code.dtype)
        for step in neighbours:
            source = code[at + step]
            np.maximum(reach, np.where(grows[source], source, np.uint32(0)), out=reach)
        taken = reach != 0
        at, gained = at[taken], reach[taken]
        code[at] = gained
        free[at] = frontier[at] = False
        left -= len(at)
        for step in neighbours:
            near = at + step
            frontier[near[free[near]]] = True
        for k, n in zip(CLASSES, np.bincount(kind_of[gained // 8], minlength=len(CLASSES))):
            canvas.voxels[k] += int(n)
    code = code.reshape(canvas.shape + 2)[1:-1, 1:-1, 1:-1]
    canvas.labels = code // np.uint32(8)
    canvas.compartments = (code % 8).astype(np.uint8)


def _keep_largest_pieces(labels: np.ndarray, min_voxels: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each segment down to its largest 6-connected piece, if it has `min_voxels`.

    Returns the pieces (uint32 [x, y, z], one label per connected piece) and two arrays
    indexed by piece label: the segment label that each kept piece belongs to (0 for a
    dropped piece) and its voxel count.
    """
    pieces, n = cc3d.connected_components(labels, connectivity=6, return_N=True)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    owner = np.zeros(n + 1, dtype=labels.dtype)
    owner[pieces.ravel()] = labels.ravel()
    order = np.lexsort((sizes, owner))
    largest = order[np.r_[owner[order][1:] != owner[order][:-1], True]]
    keep = np.zeros(n + 1, dtype=bool)
    keep[largest] = True
    keep &= sizes >= min_voxels
    return pieces, np.where(keep, owner, 0), sizes


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < MIN_SHAPE:
        raise ValueError(f"synthetic dataset shape must be three integers >= {MIN_SHAPE} "
                         f"(x, y, z voxels), got {shape!r}")
    return shape


def make_labels(shape: Sequence[int], seed: int) -> tuple[np.ndarray, dict[int, str]]:
    """A dense segmentation, uint64 [x, y, z], and the class of each segment id.

    Cells come largest first (somata with their neurites, glia, dendrites, axons), each
    steering around what is already there, and then grow into the space left. Each segment
    is cut down to its largest 6-connected piece and gets a random nonzero 64-bit id.
    """
    labels, classes, _, _ = _generate(shape, seed)
    return labels, classes


def public_compartments(codes: np.ndarray) -> np.ndarray:
    """The generator's compartment codes with boutons called axon: the compartments volume."""
    return np.where(codes == _BOUTON, np.uint8(AXON), codes)


def _generate(shape: Sequence[int], seed: int
              ) -> tuple[np.ndarray, dict[int, str], dict[int, int], np.ndarray]:
    """`make_labels`, the voxel count of each segment and the generator's compartment code of
    every voxel (COMPARTMENTS' codes, and _BOUTON for boutons; see public_compartments)."""
    shape = _check_shape(shape)
    rng = np.random.default_rng((seed, _GEOMETRY))
    canvas = _Canvas(shape)
    scale = np.prod(shape) / np.prod(DEFAULT_SHAPE)
    _place_cells(canvas, rng, max(1, round(_SOMATA * scale)), "soma", _SOMA_RADIUS, _add_soma)
    _place_cells(canvas, rng, max(1, round(_GLIA * scale)), "glia", _GLIA_RADIUS, _add_glia)
    _add_neurites(canvas, rng)
    _grow(canvas, _SHARES, _SPACE)

    pieces, owner, sizes = _keep_largest_pieces(canvas.labels, MIN_SEGMENT_VOXELS)
    kept = np.flatnonzero(owner)
    ids = _random_ids(np.random.default_rng((seed, _IDS)), len(kept))
    id_of_piece = np.zeros(len(owner), dtype=np.uint64)
    id_of_piece[kept] = ids
    classes = {int(i): canvas.kinds[owner[p]] for i, p in zip(ids, kept)}
    voxels = {int(i): int(sizes[p]) for i, p in zip(ids, kept)}
    labels = id_of_piece[pieces]
    compartments = np.where(labels != 0, canvas.compartments, np.uint8(0))
    return labels, classes, voxels, compartments


def _random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` distinct nonzero uint64 ids spread over the whole 64-bit range."""
    while True:
        ids = rng.integers(1, 2 ** 64, size=n, dtype=np.uint64, endpoint=False)
        if len(np.unique(ids)) == n:
            return ids


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour of a different label: where membranes are."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        differs = labels[tuple(a)] != labels[tuple(b)]
        edge[tuple(a)] |= differs
        edge[tuple(b)] |= differs
    return edge


def _nuclei(labels: np.ndarray, compartments: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """Masks of each cell body's nucleus, its envelope and its nucleolus: the voxels deeper
    in the body than half (envelope: the nucleus's outer two voxels) and nine tenths of its
    greatest depth."""
    bodies, _ = fastremap.renumber(np.where(compartments == SOMA, labels, 0), in_place=True)
    nucleus, envelope, nucleolus = (np.zeros(labels.shape, dtype=bool) for _ in range(3))
    for n, box in enumerate(ndi.find_objects(bodies), start=1):
        if box is None:
            continue
        depth = ndi.distance_transform_edt(bodies[box] == n)
        half = 0.5 * depth.max()
        inner = depth > half
        nucleus[box] |= inner
        envelope[box] |= inner & (depth <= half + 2)
        nucleolus[box] |= depth > 0.9 * depth.max()
    return nucleus, envelope, nucleolus


# Per compartment code (0: extracellular space, then axon, shaft, spine, soma, glia, bouton):
# cytoplasm grey (pale glia, axoplasm darker than dendrites), and mitochondria per voxel.
_CYTOPLASM = np.array([185, 128, 138, 140, 140, 160, 128], np.float32)
_MITOCHONDRIA = np.array([0, 1 / 9000, 1 / 2500, 0, 1 / 2500, 1 / 8000, 1 / 9000])


def make_em(labels: np.ndarray, compartments: np.ndarray, seed: int) -> np.ndarray:
    """uint8 EM [x, y, z] for a segmentation and its compartment codes: dark membranes,
    cytoplasm and organelles as each compartment has them, noise.

    Cytoplasm grey depends on the compartment (glia pale, axons darker) and varies a little
    per segment (a hash of its id); extracellular space is lighter, membranes at segment
    boundaries are dark. Mitochondria (dark blobs of radius 2-4 clipped to their segment) are
    common in dendrite shafts and cell bodies, rare in axons and glia, absent from spines;
    boutons are filled with vesicles (dark speckle); cell bodies hold a pale nucleus in a dark
    envelope with a dark nucleolus. A light blur and per-voxel noise give it the look of a real EM
    section. At 4x coarser voxels (the demo's) the vesicles blur into darker boutons.
    """
    rng = np.random.default_rng((seed, _EM))
    hashed = (labels * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(58)  # 0..63 per segment
    em = np.where(labels == 0, np.float32(185),
                  _CYTOPLASM[compartments] + hashed.astype(np.float32) * 0.6)
    em -= 85 * boundaries(labels)
    nucleus, envelope, nucleolus = _nuclei(labels, compartments)
    em += 30 * nucleus - 75 * envelope - 70 * nucleolus
    em -= 60 * ((compartments == _BOUTON) & (rng.random(labels.shape, dtype=np.float32) < 0.3))

    # Mitochondria, placed at random with each compartment's density, outside nuclei.
    densest = _MITOCHONDRIA.max()
    count = int(labels.size * densest)
    centers = (rng.random((count, 3)) * labels.shape).astype(np.int64)
    where = compartments[centers[:, 0], centers[:, 1], centers[:, 2]]
    keep = (rng.random(count) * densest < _MITOCHONDRIA[where]) & \
        ~nucleus[centers[:, 0], centers[:, 1], centers[:, 2]]
    centers = centers[keep]
    radii = rng.choice([2.0, 3.0, 4.0], size=len(centers))
    for radius in np.unique(radii):
        at = centers[radii == radius]
        idx = at[:, None, :] + _ball(radius)
        idx = np.clip(idx, 0, np.array(labels.shape) - 1)
        owner = labels[at[:, 0], at[:, 1], at[:, 2]]
        inside = (labels[idx[..., 0], idx[..., 1], idx[..., 2]] == owner[:, None]) & (owner[:, None] != 0)
        idx = idx[inside]
        em[idx[:, 0], idx[:, 1], idx[:, 2]] -= 55

    em += 50 * (rng.random(labels.shape, dtype=np.float32) - 0.5)  # texture, once blurred
    em = ndi.gaussian_filter(em, 0.8)
    em += 6 * rng.standard_normal(labels.shape, dtype=np.float32)
    return np.clip(np.rint(em), 0, 255).astype(np.uint8)


def _write_volume(path: Path, array: np.ndarray, kind: str, encoding: str) -> ts.Future:
    """Start writing `array` [x, y, z] as a single-scale neuroglancer precomputed volume."""
    scale = {"size": list(array.shape), "resolution": list(RESOLUTION), "encoding": encoding,
             "chunk_size": list(CHUNK_SIZE), "voxel_offset": [0, 0, 0]}
    if encoding == "jpeg":
        scale["jpeg_quality"] = 90
    if encoding == "compressed_segmentation":
        scale["compressed_segmentation_block_size"] = [8, 8, 8]
    store = ts.open({
        "driver": "neuroglancer_precomputed",
        "kvstore": f"file://{path.resolve()}/",
        "multiscale_metadata": {"type": kind, "data_type": str(array.dtype), "num_channels": 1},
        "scale_metadata": scale,
        "store_data_equal_to_fill_value": True,  # every chunk stored, as a complete volume
    }, create=True).result()
    return store[..., 0].write(array)


def _bytes_on_disk(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _replaceable(out: Path) -> bool:
    """Whether `out` may be replaced: absent, empty, or holding only a synthetic dataset."""
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    return {p.name for p in out.iterdir()} <= {*VOLUMES, CLASSES_FILE}


def write_dataset(out_dir: str | os.PathLike, shape: Sequence[int] | None = None, seed: int = 0,
                  em_encoding: str = "jpeg") -> Dataset:
    """Generate the dataset for `seed` and write it to `out_dir`, replacing an earlier one.

    Everything is written into a temporary sibling directory that is renamed to `out_dir` at
    the end, classes.json last, so a dataset that is there is complete.
    """
    shape = _check_shape(DEFAULT_SHAPE if shape is None else shape)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if em_encoding not in EM_ENCODINGS:
        raise ValueError(f"em_encoding must be one of {EM_ENCODINGS}, got {em_encoding!r}")
    if "://" in str(out_dir):
        raise ValueError(f"synthetic datasets are written to a local directory, got {out_dir}; "
                         "copy it to cloud storage afterwards if needed")
    out = Path(out_dir).absolute()
    if not _replaceable(out):
        raise FileExistsError(f"{out} exists and is not a synthetic dataset directory; "
                              "choose another output directory")
    labels, classes, voxels, codes = _generate(shape, seed)
    em = make_em(labels, codes, seed)
    compartments = public_compartments(codes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        writes = [_write_volume(tmp / "em", em, "image", em_encoding),
                  _write_volume(tmp / "segmentation", labels, "segmentation",
                                "compressed_segmentation"),
                  _write_volume(tmp / "compartments", compartments, "segmentation", "raw")]
        for write in writes:
            write.result()
        meta = {"generator": VERSION, "shape": list(shape), "seed": int(seed),
                "resolution": list(RESOLUTION),
                "classes": {str(i): c for i, c in sorted(classes.items())},
                "voxels": {str(i): voxels[i] for i in sorted(classes)},
                "compartments": {str(code): name
                                 for code, name in enumerate(COMPARTMENTS, start=1)}}
        (tmp / CLASSES_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return load_dataset(out)


def load_dataset(out_dir: str | os.PathLike) -> Dataset:
    """The dataset written by `write_dataset` at `out_dir`."""
    root = Path(out_dir).absolute()
    path = root / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no synthetic dataset at {root}: {CLASSES_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
        return Dataset(root=str(root), em=str(root / "em"), segmentation=str(root / "segmentation"),
                       compartments=str(root / "compartments"),
                       classes={int(k): v for k, v in meta["classes"].items()},
                       shape=tuple(int(n) for n in meta["shape"]), seed=int(meta["seed"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a synthetic dataset description: {e!r}") from None


def segment_voxels(dataset: Dataset) -> dict[int, int]:
    """The voxel count of each segment, as recorded in classes.json."""
    meta = json.loads((Path(dataset.root) / CLASSES_FILE).read_text())
    return {int(k): v for k, v in meta["voxels"].items()}


def summarize(dataset: Dataset) -> str:
    """Segments, voxels and volume fraction per class, and bytes on disk, as text."""
    voxels = segment_voxels(dataset)
    total = int(np.prod(dataset.shape))
    lines = [f"synthetic dataset {dataset.root}",
             f"  {' x '.join(map(str, dataset.shape))} voxels at "
             f"{' x '.join(f'{r:g}' for r in RESOLUTION)} nm, seed {dataset.seed}",
             f"  {'class':<10}{'segments':>10}{'voxels':>14}{'fraction':>10}"]
    for kind in CLASSES:
        members = [i for i, c in dataset.classes.items() if c == kind]
        count = sum(voxels[i] for i in members)
        lines.append(f"  {kind:<10}{len(members):>10}{count:>14,}{count / total:>10.3f}")
    foreground = sum(voxels.values()) / total
    lines.append(f"  foreground fraction {foreground:.3f}")
    for name in VOLUMES:
        path = Path(getattr(dataset, name))
        info = json.loads((path / "info").read_text())
        lines.append(f"  {name}: {_bytes_on_disk(path):,} bytes on disk "
                     f"({info['scales'][0]['encoding']})")
    return "\n".join(lines)
