"""Which PLUG or UNPLUG the driver sends next: the order rules over its unit bitmap.

Rules (the driver's module rules, "Plug order" and "Unplug order"): ``units`` has bit
``i`` set when unit ``i`` is plugged; units come in groups of ``upg`` (memory blocks in
SBM, one big block per group in BBM). Each function returns ``(type, first unit, unit
count)`` or None, and changes nothing.

* :func:`next_plug`: among the first ``usable`` groups, the lowest partially plugged group
  (from its lowest unplugged unit, a run of unplugged units up to ``nb`` and the group's
  end), else the lowest empty group (from unit 0, up to ``nb`` and the whole group).
* :func:`next_unplug`: the highest partially plugged group (its highest plugged unit,
  alone), else the highest fully plugged group: whole when ``nb`` covers a group, else its
  highest unit alone.
"""

from __future__ import annotations

from ramdiscard.guest.codec import ReqType

Next = tuple[ReqType, int, int]


def next_plug(units: int, upg: int, usable: int, nb: int) -> Next | None:
    """The next PLUG for ``nb`` more units (module rules)."""
    # One ascending pass: the lowest partially plugged group wins; failing that, the
    # lowest empty one. Once nothing is plugged above, the rest are empty.
    if nb <= 0:
        return None
    full = (1 << upg) - 1
    rest = units
    empty = -1
    for g in range(usable):
        if not rest:
            if empty < 0:
                empty = g
            break
        bits = rest & full
        rest >>= upg
        if bits == full:
            continue
        if bits:
            first = first_clear(bits)
            return ReqType.PLUG, g * upg + first, _run_length(bits, first, nb, upg)
        if empty < 0:
            empty = g
    if empty < 0:
        return None
    return ReqType.PLUG, empty * upg, min(nb, upg)


def next_unplug(units: int, upg: int, groups: int, nb: int) -> Next | None:
    """The next UNPLUG for ``nb`` fewer units among ``groups`` groups (module rules)."""
    if nb <= 0:
        return None
    full = (1 << upg) - 1
    top_full = -1
    for g in range(min(groups, -(-units.bit_length() // upg)) - 1, -1, -1):
        bits = (units >> (g * upg)) & full
        if not bits:
            continue
        if bits != full:
            return ReqType.UNPLUG, g * upg + bits.bit_length() - 1, 1
        if top_full < 0:
            top_full = g
    if top_full < 0:
        return None
    if nb >= upg:
        return ReqType.UNPLUG, top_full * upg, upg
    return ReqType.UNPLUG, top_full * upg + upg - 1, 1


def first_clear(bits: int) -> int:
    """Index of the lowest clear bit."""
    return (~bits & (bits + 1)).bit_length() - 1


def _run_length(bits: int, first: int, nb: int, limit: int) -> int:
    """Clear bits from ``first`` (clear) upward, at least 1, at most ``nb`` and not beyond
    ``limit``."""
    above = bits >> first
    run = (above & -above).bit_length() - 1 if above else limit - first
    return max(1, min(nb, limit - first, run))
