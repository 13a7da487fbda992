"""Build script. The package is pure Python (Triton kernels compile at run time); the native NF4
extension under csrc/ will be added here as a pybind11 extension built with ninja."""

from setuptools import setup

setup()
