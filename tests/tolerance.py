"""The equality contract of embeddings (README, "What is equal to what").

The network's kernels (oneDNN on CPUs, cuDNN on GPUs) block and order their float32 reductions
by the shape of the batch, so one cutout embedded beside other cutouts, at another position or
in a batch of another size, gives other last bits. Embeddings of the same cutout computed in
different batches agree to BATCH_TOLERANCE of the embedding's norm. Measured on a 2-core AMD
EPYC (AVX2): at most 1.7e-7 (test widths, 33^3), 2.6e-7 (published widths, 33^3) and 2.1e-7
(published, 129^3), about 2 float32 ulps (1.2e-7) of the norm; the bound leaves a factor of 40
for other kernels and other CPUs. It is a bound for float32 arithmetic; GPUs were not measured
(TensorFlow runs convolutions in TensorFloat-32 on Ampere and newer GPUs unless told not to).
"""

from __future__ import annotations

import numpy as np

BATCH_TOLERANCE = 1e-5  # max |a - b| over an embedding's values, relative to its L2 norm


def assert_embeddings_close(found: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Rows of `found` within BATCH_TOLERANCE of the same rows of `expected`."""
    found, expected = np.atleast_2d(found), np.atleast_2d(expected)
    assert found.shape == expected.shape, f"{what}: shapes {found.shape} != {expected.shape}"
    norms = np.linalg.norm(expected.astype(np.float64), axis=-1)
    error = np.abs(found.astype(np.float64) - expected).max(axis=-1) / np.maximum(norms, 1e-30)
    worst = int(np.argmax(error))
    assert error[worst] <= BATCH_TOLERANCE, (
        f"{what}: row {worst} differs by {error[worst]:.2e} of its norm "
        f"(> {BATCH_TOLERANCE:.0e})")
