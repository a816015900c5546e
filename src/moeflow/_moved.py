"""Deprecated import locations: names that moved in the 0.2 layout keep working from their old
package for one release, with a :class:`DeprecationWarning` that names the new home.

An old package declares ``__getattr__ = moved_names(__name__, {"Name": "new.module"})`` (or
``"new.module:new_name"`` for a name that was renamed too); the new module is imported only
when an old name is first used, so the old package does not depend on the new one at import
time.
"""

from __future__ import annotations

import importlib
import warnings


def moved_names(package: str, table: dict[str, str]):
    """A module ``__getattr__`` resolving each name of ``table`` from its new module."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        new, _, attr = table[name].partition(":")
        attr = attr or name
        warnings.warn(
            f"{package}.{name} moved to {new}.{attr}; the old location goes away in the "
            "next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), attr)

    return __getattr__
