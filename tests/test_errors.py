"""The error taxonomy: every public exception of the library is a RamDiscardError of exactly
one kind (argument, state, resource exhausted, host, protocol), a package root, or a
listener-failure report; and the curated top level exports every root."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import ramdiscard
from ramdiscard import errors

KINDS = (
    errors.InvalidArgument,
    errors.InvalidState,
    errors.ResourceExhausted,
    errors.HostError,
    errors.ProtocolViolation,
)
# Package roots exist so callers can catch one package's errors at once; their leaves carry
# the kind. The fuzz harness's control-flow exceptions are not library errors.
PACKAGE_ROOTS = {"VirtioMemError", "VfioError", "MigrationError"}
NOT_LIBRARY = ("ramdiscard.fuzz",)


def _public_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(ramdiscard.__path__, "ramdiscard."):
        if info.name.startswith(NOT_LIBRARY) or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
                and not name.startswith("_")
                and not issubclass(obj, Warning)
            ):
                found[f"{info.name}.{name}"] = obj
    return found


EXCEPTIONS = _public_exceptions()


def test_the_walk_finds_the_known_errors() -> None:
    names = {qual.rsplit(".", 1)[1] for qual in EXCEPTIONS}
    assert {"ProtocolError", "MappingLimitError", "MemslotsExhausted", "IovaExhausted", "QmpError"} <= names


@pytest.mark.parametrize("qualname", sorted(EXCEPTIONS))
def test_every_error_is_a_ramdiscard_error_of_one_kind(qualname: str) -> None:
    cls = EXCEPTIONS[qualname]
    assert issubclass(cls, errors.RamDiscardError), f"{qualname} is outside the root"
    if cls.__name__ in PACKAGE_ROOTS or cls in KINDS or cls is errors.RamDiscardError:
        return
    if issubclass(cls, errors.ListenerFailure):
        assert not any(issubclass(cls, k) for k in KINDS), f"{qualname} is a report and a kind"
        return
    kinds = [k.__name__ for k in KINDS if issubclass(cls, k)]
    assert len(kinds) == 1, f"{qualname} is of kinds {kinds}; expected exactly one"


def test_exhausted_resources_share_one_kind() -> None:
    from ramdiscard.consumers.blockdma.errors import IovaExhausted
    from ramdiscard.consumers.kvm import MemslotsExhausted
    from ramdiscard.consumers.vfio import DmaLimitError, MappingLimitError

    for cls in (IovaExhausted, MemslotsExhausted, DmaLimitError, MappingLimitError):
        assert issubclass(cls, errors.ResourceExhausted)


def test_argument_and_host_errors_keep_their_builtin_bases() -> None:
    assert issubclass(errors.InvalidArgument, ValueError)
    assert issubclass(errors.HostMemoryError, OSError)
    err = errors.HostMemoryError(12, "madvise failed")
    assert err.errno == 12


def test_top_level_exports_what_a_library_user_needs() -> None:
    for name in (
        "RamBlock",
        "VfioContainer",
        "IoUringDmaBackend",
        "MlockDmaBackend",
        "NullDmaBackend",
        "AggregateManager",
        "ProtocolError",
        "RamDiscardError",
        "InvalidArgument",
        "InvalidState",
        "ResourceExhausted",
        "HostError",
        "ProtocolViolation",
    ):
        assert name in ramdiscard.__all__
        assert getattr(ramdiscard, name) is not None
    for name in ramdiscard.__all__:
        assert hasattr(ramdiscard, name), name
