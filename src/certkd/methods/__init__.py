"""The training methods, one class per method, found by name in a registry (docs/method.md §4).

Every module of this package is imported once, here, so that its ``@register_method`` classes
are known; :mod:`certkd.config` derives its method lists from the registry and the CLI its help.
Method modules import torch only inside their methods, so listing the methods stays cheap
(``certkd train --help`` does not import torch). Adding a method is one class in one new file of
this package (docs/method.md, "Adding a training method").
"""
from __future__ import annotations

import importlib
import pkgutil

from certkd.methods.base import (CATEGORIES, Batch, Method, ReferenceCase, method_category, method_class,
                                 method_names, register_method)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["CATEGORIES", "Batch", "Method", "ReferenceCase", "method_category", "method_class", "method_names",
           "register_method"]
