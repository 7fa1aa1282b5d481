"""Installs tfqkd: `pip install .` (library), `pip install .[test]` (plus the test tools)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "tensorflow==2.21.*",
    "tf-keras==2.21.*",
    "tensorflow-model-optimization==0.8.1",
    "tensorflow-datasets",
    "importlib_resources",  # tfds imports it but does not declare it
    "keras-tuner>=1.4,<1.5",
    "absl-py",
    "ai-edge-litert",
    "scikit-learn",
    "matplotlib",
    "numpy",
]
EXTRAS = {
    "test": ["pytest", "pytest-xdist", "hypothesis"],  # the suite runs on 2 workers (-n 2)
    "tune": [],  # keras-tuner is a core dependency; kept for `pip install .[tune]` scripts
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="tfqkd",
    version="0.1.0",
    description="Low-bit quantized networks trained with knowledge distillation, exported to TFLite",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tfqkd", "tfqkd.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
