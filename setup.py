from setuptools import setup

setup(
    name="otter-flamingo",
    version="0.1.0",
    description="Flamingo-style multimodal in-context learning (OpenFlamingo / Otter) on transformers 5",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the folders a reader sees are the subpackages the library has: conversion/ is otter.conversion, etc.
    packages=["otter", "otter.conversion", "otter.train", "otter.eval"],
    package_dir={
        "otter": "otter",
        "otter.conversion": "conversion",
        "otter.train": "train",
        "otter.eval": "eval",
    },
    install_requires=[line.strip() for line in open("requirements.txt") if line.strip() and not line.startswith("#")],
    extras_require={"test": ["pytest>=8", "open-clip-torch>=2.23", "tensorboard>=2.14"],
                    "train": ["tensorboard>=2.14"]},
    package_data={"otter": ["models/shapesworld/*"], "otter.train": ["configs/*.yaml", "README.md"]},
    entry_points={"console_scripts": ["otter=otter.cli:main"]},
)
