"""What pyproject.toml cannot say.

* The vCPU run loop in C (vmm/runloop.c) is compiled at install time
  through cffi.
* One import name: the component folders at the top of the repository
  (vmm/, devices/, liveupdate/, metrics/) are installed inside the ``luvmm``
  package, as ``luvmm.vmm`` and so on -- no generic top-level name goes
  into site-packages (luvmm/__init__.py finds them the same way from a
  checkout)."""

import os

from setuptools import find_packages, setup

COMPONENTS = ("vmm", "devices", "liveupdate", "metrics")

packages = find_packages(include=["luvmm", "luvmm.*"])
package_dir = {"luvmm": "luvmm"}
for top in COMPONENTS:
    package_dir[f"luvmm.{top}"] = top
    packages += [f"luvmm.{p}" for p in find_packages(include=[top, f"{top}.*"])]

setup(packages=packages, package_dir=package_dir, cffi_modules=["vmm/runloop_build.py:ffibuilder"])
