"""Multi-host runs: every host runs the same program, and one mesh spans all their devices.

    from dlmjax import distributed
    distributed.initialize()  # first, before anything touches the devices
    lm = dlmjax.load(path, mesh="fsdp=4,tensor=4")  # 16 devices over 4 hosts

`initialize` finds the other processes from, in this order: its arguments; the variables
DLMJAX_COORDINATOR (host:port of process 0), DLMJAX_NUM_PROCESSES, DLMJAX_PROCESS_ID and
DLMJAX_LOCAL_DEVICE_IDS (optional, e.g. 0,1); with none of these, JAX's own detection of
Cloud TPU pods, SLURM and Open MPI jobs, and a single process when it detects none.
Inputs are then built whole on every host (`sharding.put_global`) and results gathered
back to every host (`sharding.to_host`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

import jax

from dlmjax.errors import DlmjaxError

logger = logging.getLogger("dlmjax.distributed")

ENV = {
    "coordinator_address": "DLMJAX_COORDINATOR",
    "num_processes": "DLMJAX_NUM_PROCESSES",
    "process_id": "DLMJAX_PROCESS_ID",
    "local_device_ids": "DLMJAX_LOCAL_DEVICE_IDS",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where this process sits in the run; all None = let JAX detect the cluster."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def explicit(self) -> bool:
        return (self.coordinator_address, self.num_processes, self.process_id) != (None, None, None)


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether any DLMJAX_* variable of a multi-host run is set."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in ENV.values())


def settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The arguments, else the DLMJAX_* variables, checked for consistency."""
    environ = os.environ if environ is None else environ

    def pick(field, value):
        """(value, the name to blame in an error)."""
        if value is not None:
            return value, field
        return environ.get(ENV[field]) or None, ENV[field]

    def integer(field, value):
        value, name = pick(field, value)
        if value is None:
            return None, name
        try:
            return int(value), name
        except (TypeError, ValueError):
            raise DlmjaxError(f"{name}={value!r} is not an integer; give e.g. {name}=2") from None

    coordinator, coordinator_name = pick("coordinator_address", coordinator_address)
    count, count_name = integer("num_processes", num_processes)
    index, index_name = integer("process_id", process_id)
    ids, ids_name = pick("local_device_ids", local_device_ids)
    if isinstance(ids, str):
        try:
            ids = tuple(int(i) for i in ids.split(",") if i.strip())
        except ValueError:
            raise DlmjaxError(f"{ids_name}={ids!r} is not a comma-separated list of device ids, e.g. 0,1") from None
    elif ids is not None:
        ids = tuple(int(i) for i in ids)

    if count is not None and count < 1:
        raise DlmjaxError(f"{count_name}={count} must be at least 1")
    if index is not None and index < 0:
        raise DlmjaxError(f"{index_name}={index} is negative; number the processes 0, 1, ..")
    if (coordinator is not None or index is not None or (count or 1) > 1) and (count is None or index is None):
        missing = index_name if count is not None else count_name
        raise DlmjaxError(
            f"a multi-host run needs {missing} as well (coordinator, process count and process id go together); "
            "set all of DLMJAX_COORDINATOR, DLMJAX_NUM_PROCESSES and DLMJAX_PROCESS_ID, or none to let JAX detect a "
            "TPU pod or SLURM job"
        )
    if count is not None and index is not None and index >= count:
        raise DlmjaxError(f"{index_name}={index} is not below {count_name}={count}; number the processes 0..{count - 1}")
    if count is not None and count > 1:
        if coordinator is None:
            raise DlmjaxError(
                f"{count_name}={count} needs the coordinator, host:port of process 0 (coordinator_address or DLMJAX_COORDINATOR)"
            )
        host, _, port = str(coordinator).rpartition(":")
        if not host or not port.isdigit():
            raise DlmjaxError(f"{coordinator_name}={coordinator!r} is not host:port; give e.g. 10.0.0.1:8476")
    return Settings(coordinator, count, index, ids)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> int:
    """Join the other processes of a multi-host run; returns the number of processes.

    Call it first, before anything touches the devices. Calling it again does nothing, and
    a single process (num_processes=1, or nothing set and no cluster detected) joins nothing.
    """
    if jax.distributed.is_initialized():
        return _report()
    s = settings(coordinator_address, num_processes, process_id, local_device_ids)
    if s.num_processes == 1:
        logger.info("one process: nothing to join")
        return 1
    ids = list(s.local_device_ids) if s.local_device_ids is not None else None
    try:
        if s.explicit:
            jax.distributed.initialize(s.coordinator_address, s.num_processes, s.process_id, local_device_ids=ids)
        else:
            try:
                jax.distributed.initialize(local_device_ids=ids)
            except ValueError as e:  # JAX found no TPU pod, SLURM or Open MPI job to read the settings from
                logger.info("no cluster detected (%s): one process", e)
                return 1
    except RuntimeError as e:
        if "before" not in str(e):
            raise
        raise DlmjaxError(
            "dlmjax.distributed.initialize() ran after JAX started its devices; call it first, before loading a model "
            "or any other JAX call"
        ) from None
    return _report()


def _report() -> int:
    count = jax.process_count()
    logger.info(
        "process %d of %d: %d local devices of %d (%s)",
        jax.process_index(), count, jax.local_device_count(), jax.device_count(), jax.devices()[0].platform,
    )
    return count
