"""Finds `ligerfx.kernels` and `ligerfx.patterns`: the top-level kernels/ and patterns/ folders.

Those folders have no __init__.py, on purpose.  A folder with one is a regular package, and a
regular package in a directory on sys.path shadows every installed distribution of the same
top-level name; the repository root is on sys.path whenever Python starts there (`python -m
ligerfx`, a script or notebook, pytest's rootdir), and Hugging Face's `kernels`, which
transformers imports at start-up, is one such name.  Without __init__.py a folder is at most a
PEP 420 namespace portion, which the import system uses only when no regular package or module of
that name exists anywhere on sys.path, so the root can no longer hide another distribution.

What was each package's __init__.py is its `_package.py`.  This finder, put first on
sys.meta_path when ligerfx is imported, loads that file as the package and searches the folder for
its modules: in a source checkout (editable install: setuptools' finder does not resolve a
namespace package nested under a mapped one) the folders beside ligerfx/, in an installed wheel
the copies inside it.  Importing `ligerfx.patterns.rope` therefore still runs the package first,
which registers every built-in family in its fixed order, exactly as an __init__.py did.
"""

from __future__ import annotations

import importlib.util
import os
import sys

NAMES = ("kernels", "patterns")


class SubpackageFinder:
    """A meta path finder for `<package>.kernels` and `<package>.patterns` alone."""

    def __init__(self, package: str, package_dir: str):
        self.folders = {}
        for name in NAMES:
            inside = os.path.join(package_dir, name)          # an installed wheel
            beside = os.path.join(os.path.dirname(package_dir), name)  # a source checkout
            folder = inside if os.path.isdir(inside) else beside
            if os.path.isfile(os.path.join(folder, "_package.py")):
                self.folders[f"{package}.{name}"] = folder

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "_package.py"), submodule_search_locations=[folder])

    def invalidate_caches(self):
        pass


def install(package: str, package_dir: str) -> None:
    if not any(isinstance(f, SubpackageFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SubpackageFinder(package, package_dir))
