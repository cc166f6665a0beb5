"""Install cmtl. `cmtl.strategies` and `cmtl.scenarios` live in top-level folders but are installed
under the `cmtl` namespace only, so no bare `strategies`/`scenarios` import name leaks out."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "cmtl" / "version.py").read_text(), VERSION)

setup(
    name="cmtl",
    version=VERSION["__version__"],
    description="Continual multi-task learning for Vision Transformers (EMTAL-style MoEfied LoRA, "
    "QR distillation, router fading and exact consolidation)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cmtl", "cmtl.strategies", "cmtl.scenarios"],
    package_dir={"cmtl": "cmtl", "cmtl.strategies": "strategies", "cmtl.scenarios": "scenarios"},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0.20",
        "avalanche-lib==0.6.0",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "matplotlib",
        "scipy",
        "scikit-learn",
    ],
    extras_require={
        "test": ["pytest", "ruff"],
        "peft": ["peft"],
    },
    entry_points={"console_scripts": ["cmtl = cmtl.cli:main"]},
)
