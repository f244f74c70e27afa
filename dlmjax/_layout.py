"""Make the top-level `convert/` and `kernels/` folders importable as `dlmjax.convert`
and `dlmjax.kernels` when running from a source checkout (PYTHONPATH=. or an editable
install). An installed wheel ships them inside the package, and this finder then does
nothing."""

from __future__ import annotations

import importlib.abc
import importlib.util
import pathlib
import sys

SIBLINGS = ("convert", "kernels")


class _SiblingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: pathlib.Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "dlmjax" or name.split(".")[0] not in SIBLINGS:
            return None
        parts = name.split(".")
        base = self.root.joinpath(*parts)
        if (base / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(fullname, base / "__init__.py", submodule_search_locations=[str(base)])
        if base.with_suffix(".py").is_file():
            return importlib.util.spec_from_file_location(fullname, base.with_suffix(".py"))
        return None


def install(package_dir: pathlib.Path) -> None:
    root = package_dir.parent
    if all((package_dir / s).exists() for s in SIBLINGS):
        return  # installed layout: the subpackages are real
    if any((root / s / "__init__.py").is_file() for s in SIBLINGS):
        if not any(isinstance(f, _SiblingFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _SiblingFinder(root))
