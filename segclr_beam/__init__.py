"""SegCLR embeddings of a segmented EM volume, as an Apache Beam pipeline.

TensorFlow runs its oneDNN CPU kernels by default only on CPUs with AVX-512; on others
(AVX2 laptops, most AMD servers) its own convolutions run the SegCLR network several times
slower. The package turns them on before TensorFlow loads, unless TF_ENABLE_ONEDNN_OPTS is
already set; results differ from the other kernels by float32 rounding only.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
