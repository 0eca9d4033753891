"""A griffe extension for the Reference page: what the source cannot show until the package is imported.

``infonce`` and ``InfoNCE`` carry an ``{options}`` placeholder in their source docstrings, which the end of
``pml_triplets/loss.py`` replaces with the option entries when the module is imported; their option defaults are
written ``DEFAULT.<name>`` (one record of defaults, ``pml_triplets/_options.py``). mkdocstrings reads the source
statically, which keeps the signatures' ``Literal[...]`` annotations exact; for those objects this extension takes
the docstring and those defaults from the imported objects, as ``help()`` shows them.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import griffe

PLACEHOLDER = "{options}"


def _imported(obj: griffe.Object) -> Any:
    """The imported object ``obj`` describes, after checking that it comes from the file the docs read."""
    module = importlib.import_module(obj.module.path)
    if Path(module.__file__ or "").resolve() != Path(str(obj.filepath)).resolve():
        raise RuntimeError(
            f"{obj.path}: imported {module.__file__}, but the docs read {obj.filepath}; "
            "install this checkout (pip install -e .) or put it first on PYTHONPATH"
        )
    found: Any = module
    for name in obj.path[len(obj.module.path) + 1 :].split("."):
        found = getattr(found, name)
    return found


def _spliced(obj: griffe.Object) -> None:
    if obj.docstring is not None and PLACEHOLDER in obj.docstring.value:
        doc = inspect.getdoc(_imported(obj)) or ""
        if PLACEHOLDER not in doc:  # spliced (a docstring that only mentions the placeholder stays as it is)
            obj.docstring.value = doc


class SplicedOptions(griffe.Extension):
    """Docstrings holding ``{options}`` and defaults written ``DEFAULT.<name>``, taken from the imported objects."""

    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        """A function's spliced docstring and its defaults' values."""
        _spliced(func)
        symbolic = [p for p in func.parameters if str(p.default).startswith("DEFAULT.")]
        if symbolic:
            runtime = inspect.signature(_imported(func)).parameters
            for param in symbolic:
                param.default = repr(runtime[param.name].default)

    def on_class_instance(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        """A class's spliced docstring."""
        _spliced(cls)
