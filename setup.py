"""Installs tfqkd: `pip install .` (the library and its command-line recipes), `pip install .[test]`
(plus the test tools).

The `recipes` package is installed beside `tfqkd`, so `python recipes/x.py` from a checkout and
`python -m recipes.x` import it like any package, and each recipe is a console command.
"""

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

#: One command per recipe: `tfqkd-train-teacher ...` runs `python recipes/train_teacher.py ...`.
CONSOLE_SCRIPTS = [
    f"tfqkd-{name.replace('_', '-')} = recipes.{name}:main"
    for name in ("train_teacher", "train_student", "quantize_distill", "qkd", "speq", "sweep",
                 "search_bits", "quickstart")
]

setup(
    name="tfqkd",
    version="0.1.0",
    description="Low-bit quantized networks trained with knowledge distillation, exported to TFLite",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tfqkd", "tfqkd.*", "recipes"]),
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
