"""The one thing pyproject.toml cannot say: the vCPU run loop in C
(vmm/runloop.c) is compiled at install time through cffi."""

from setuptools import setup

setup(cffi_modules=["vmm/runloop_build.py:ffibuilder"])
