"""Build of the compiled core (exporter/_core.c); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("exporter._core", ["exporter/_core.c"], extra_compile_args=["-O2", "-Wall", "-Wextra"])])
