"""segclr-beam: SegCLR embeddings of EM segmentations with Apache Beam."""

from setuptools import find_packages, setup

setup(
    name="segclr-beam",
    version="0.1.0",
    description="Apache Beam pipeline that turns an EM volume and its segmentation into SegCLR embeddings",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["segclr_beam", "segclr_beam.*", "pipelines", "pipelines.*"]),
    package_data={"pipelines": ["*.json"]},
    install_requires=[
        "apache-beam[gcp]==2.77.*",
        "cloud-volume>=12.0",  # precomputed volumes TensorStore cannot decode
        "compresso>=3.3",
        "crackle-codec>=0.55",
        "fastavro>=1.9",
        "fastremap>=1.14",
        "google-cloud-storage>=2.14",
        "kimimaro>=5.0",
        "mmh3>=4.0",  # the annotation layer's shard rule (murmurhash3_x86_128), in C
        # The annotation writer and the viewer; 2.41 needs a google-apitools that
        # apache-beam[gcp] excludes on Python < 3.13.
        "neuroglancer==2.40.*",
        "numpy>=1.26",
        "osteoid>=0.7",
        "scikit-learn>=1.4",  # evaluate: k-NN and linear probes, grouped cross-validation
        "scipy>=1.11",
        "tensorstore>=0.1.60",
    ],
    extras_require={
        # TensorFlow comes as an extra so that a laptop never downloads CUDA libraries it
        # cannot use, while the GPU worker image (docker/) installs the CUDA build.
        "cpu": ["tensorflow-cpu==2.21.*"],
        "gpu": ["tensorflow[and-cuda]==2.21.*"],
        "demo": ["matplotlib>=3.8", "umap-learn>=0.5.7"],  # classify report's pictures
        "test": ["pytest>=8", "gcp-storage-emulator>=2024.8.3"],
    },
    entry_points={"console_scripts": ["segclr-beam=segclr_beam.cli:main"]},
)
