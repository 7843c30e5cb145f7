"""Build script. The compiled extension (csrc/) is added here; everything else is in
pyproject.toml."""

from setuptools import setup

setup()
