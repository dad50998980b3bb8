"""Scenario files: a TOML description of a VM's sparse RAM, its consumers and a step list.

Rules:

* :func:`load_scenario` / :func:`parse_scenario` return a frozen :class:`Scenario` or raise
  :class:`ScenarioError` whose message is one line naming the source and the offending
  key, e.g. ``scenario.toml: devices[0].block-size: must be a power of two >= 1M, got "3M"``.
  Nothing else is raised for any file content.
* Unknown keys are errors (a typo must not silently fall back to a default).
* Sizes are strings with binary suffixes ("2M", "4G") or integers (bytes); addresses may
  also be hex strings ("0x100000000").
* Cross-checks: device ids unique, device ranges inside the 48-bit address space and
  overlapping neither boot RAM nor each other, steps naming existing devices.
* Device properties (``block-size`` and its default, ``size``, ``addr``,
  ``requested-size``, also in steps) are judged by the virtio-mem device's own checks, so
  a value gets the same answer and the same default here as when the device is realized
  (:mod:`~ramdiscard.machine.scenario.devices`).

Modules: :mod:`.model` (the frozen specs), :mod:`.fields` (one value, one-line errors),
:mod:`.devices`, :mod:`.consumers`, :mod:`.workload`, :mod:`.steps` (one table each),
:mod:`.load` (the file and the top level), :mod:`.realguest` (a file with a ``[guest]``
table: a real Linux guest under QEMU, :func:`load_any_scenario`; :func:`load_scenario`
refuses it with a one-line error).

Schema (keys use QEMU's hyphenated spelling)::

    name = "demo"                    # optional
    description = "..."              # optional
    boot-ram = "1G"                  # default 1G; "0" for none
    boot-backing = "anonymous"       # anonymous | memfd

    [[devices]]                      # virtio-mem devices, at least one
    id = "vmem0"                     # required, unique
    size = "16G"                     # required, multiple of block-size
    block-size = "2M"                # power of two >= 1M (default: the device's, the THP size)
    backing = "anonymous"            # anonymous | memfd | file
    thp = true                       # anonymous only: transparent huge pages
    path = "/dev/shm/vmem0.mem"      # file only; default <workdir>/<id>.mem
    overwrite = false                # file only: may an existing non-empty file be used
                                     # (its contents are discarded)? false: refused
    addr = "0x100000000"             # default: after boot RAM / previous device, 1G-aligned, >= 4G
    requested-size = "0"             # at start
    dynamic-memslots = false
    memslot-limit = 0                # 0: unlimited (with dynamic-memslots)
    prealloc = false

    [[consumers]]
    type = "vfio"                    # vfio | kvm | blockdma
    id = "vfio0"                     # optional (default <type><index>)
    backend = "auto"                 # vfio, blockdma: auto | io_uring | mlock | null
    coordinate-discards = true       # vfio, blockdma: false = pin whole regions (ignore the RDM)
    dma-limit = 65535                # vfio: the type1 dma_entry_limit
    dma-limit-check = true           # vfio: QEMU 10.2's worst-case check when a section registers
    mode = "auto"                    # kvm: auto | kvm (real /dev/kvm) | model
    iova-base = "0x100000000"        # blockdma: its private IOVA window ...
    iova-size = "0xffff00000000"     # blockdma: ... and its size
    iova-align = "2M"                # blockdma: alignment of each RAM block's IOVA range

    [workload]
    touch = 0.25                     # fraction of plugged memory the guest writes
    write-rate = "50M"               # a writer thread: bytes/s into plugged memory (0 = none)
    write-pattern = "random"         # random | hot (within hot-set) | sequential (4 KiB pages)
    hot-set = "64M"

    [[steps]]                        # run in order
    requested-size = { vmem0 = "4G" }   # or one size when there is one device
    # action = "resize" | "unplug-all" | "system-reset" | "pause"; device = "vmem0"; seconds = 1.0
    # action = "snapshot" | "restore" | "dump"; path = "..." (optional)
    # action = "migrate"; transport = "file" | "tcp"; path = "..." (file only, optional)
    # action = "live-migrate"; downtime-limit = 300 (ms); max-bandwidth = "0" (bytes/s);
    #   requested-size = ... (optional: a resize while the migration runs)
    label = "grow"                   # optional

Step actions ``snapshot`` (save to ``path``, default a file in the machine's snapshot
directory), ``restore`` (load ``path``, default the latest snapshot, into the running
machine, as QEMU's loadvm), ``migrate`` (to a fresh machine built from the same scenario,
through a file or a local TCP connection), ``live-migrate`` (precopy to such a machine
with the guest thread and writer running, an optional resize meanwhile; digests of both
ends compared) and ``dump`` (ELF core of the populated memory
at ``path``) are run by :class:`~ramdiscard.machine.Machine`; every one checks the guest
memory's integrity afterwards.
"""

from ramdiscard.machine.scenario.load import (
    load_any_scenario,
    load_scenario,
    parse_any_scenario,
    parse_scenario,
    scenario_from_dict,
)
from ramdiscard.machine.scenario.model import (
    ADDRESS_LIMIT,
    Action,
    Backing,
    ConsumerSpec,
    ConsumerType,
    DeviceSpec,
    DmaBackendKind,
    KvmMode,
    Scenario,
    ScenarioError,
    StepSpec,
    Transport,
    WorkloadSpec,
)
from ramdiscard.machine.scenario.realguest import GuestAction, GuestScenario, GuestSpec, GuestStepSpec

__all__ = [
    "ADDRESS_LIMIT",
    "Action",
    "Backing",
    "ConsumerSpec",
    "ConsumerType",
    "DeviceSpec",
    "DmaBackendKind",
    "GuestAction",
    "GuestScenario",
    "GuestSpec",
    "GuestStepSpec",
    "KvmMode",
    "Scenario",
    "ScenarioError",
    "StepSpec",
    "Transport",
    "WorkloadSpec",
    "load_any_scenario",
    "load_scenario",
    "parse_any_scenario",
    "parse_scenario",
    "scenario_from_dict",
]
