"""For tools that still run setup.py: the package is described in pyproject.toml."""

from setuptools import setup

setup()
