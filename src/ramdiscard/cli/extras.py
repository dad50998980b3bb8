"""What the command line needs beyond the library: the ``cli`` extra.

``pip install ramdiscard`` installs the library only (numpy). Terminal output (rich),
plots (matplotlib) and the QMP client of ``ramdiscard top`` (qemu.qmp) come with
``pip install 'ramdiscard[cli]'``. A command checks what it needs with :func:`require`
before it does anything, so a missing package costs one line, not a traceback or work
thrown away.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from ramdiscard.errors import InvalidState

#: Top-level import name -> distribution name, for every package of the ``cli`` extra.
CLI_EXTRA: dict[str, str] = {"rich": "rich", "matplotlib": "matplotlib", "qemu": "qemu.qmp"}

HINT = "pip install 'ramdiscard[cli]'"


class MissingExtra(InvalidState):
    """A command needs a package of the ``cli`` extra that is not installed."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(modules: Iterable[str]) -> list[str]:
    """The distributions (of ``modules``, import names) that cannot be imported."""
    out: list[str] = []
    for m in modules:
        if not _importable(m):
            dist = CLI_EXTRA.get(m.partition(".")[0], m)
            if dist not in out:
                out.append(dist)
    return out


def message(what: str, dists: Iterable[str]) -> str:
    """The one-line hint: ``what`` needs ``dists``, which come with the extra."""
    return f"{what} needs {', '.join(dists)} (the 'cli' extra): {HINT}"


def require(what: str, modules: Iterable[str]) -> None:
    """Raise :class:`MissingExtra` (hint as message) if any of ``modules`` is not importable."""
    absent = missing(modules)
    if absent:
        raise MissingExtra(message(what, absent))


def hint_for(exc: ModuleNotFoundError) -> str | None:
    """The hint for an import of a ``cli`` extra package that failed anyway, else None."""
    root = (exc.name or "").partition(".")[0]
    if root not in CLI_EXTRA:
        return None
    return message("this command", [CLI_EXTRA[root]])
