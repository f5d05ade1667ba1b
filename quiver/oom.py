"""Why a step process was killed: the evidence of the step's own memory cgroup, not of the whole host.

A step process lives in the cgroup of the run that forked it. Its `memory.events` (cgroup v2) or
`memory.oom_control` (cgroup v1) counts the OOM kills inside that group only: an increase while the run ran
is the kernel killing this run's processes for memory, whatever happens elsewhere on the host. With no memory
cgroup to read (another OS, an unusual mount), the host-wide count is the only evidence, and the explanation
says that it is host-wide.
"""

from dataclasses import dataclass
from pathlib import Path

from quiver.memory import Limits, env_need, format_size

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class OomCounter:
    """Where OOM kills are counted for a process, and how many so far."""

    kills: int | None
    scope: str  # "cgroup <path>" or "host"
    source: Path | None = None  # the file the count was read from

    def again(self) -> "OomCounter":
        """The same counter read now (a step's cgroup can be read after the step process is gone)."""
        if self.scope == "host" or self.source is None:
            return _host_counter()
        kills = _read_count(self.source)
        return OomCounter(kills, self.scope, self.source)


def _read_count(events: Path) -> int | None:
    try:
        for row in events.read_text().splitlines():
            name, _, value = row.partition(" ")
            if name == "oom_kill":
                return int(value)
    except OSError:
        pass
    return None


def _cgroup_counter(pid: int | str = "self") -> OomCounter | None:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified hierarchy
            events = CGROUP_ROOT / path.lstrip("/") / "memory.events"
        elif "memory" in controllers.split(","):  # cgroup v1: the memory controller's own hierarchy
            events = CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.oom_control"
        else:
            continue
        kills = _read_count(events)
        if kills is not None:
            return OomCounter(kills, f"cgroup {path}", events)
    return None


def _host_counter() -> OomCounter:
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return OomCounter(int(line.split()[1]), "host", Path("/proc/vmstat"))
    except OSError:
        pass
    return OomCounter(None, "host")


def oom_counter(pid: int | str = "self") -> OomCounter:
    """The OOM-kill count of a process's memory cgroup, or the host's when there is none to read."""
    return _cgroup_counter(pid) or _host_counter()


def explain_kill(step_key: str, memory_class: str | None, limits: Limits, before: OomCounter, now: OomCounter,
                 peak_rss: int | None) -> str:
    """What a run says of a step process killed by SIGKILL."""
    counted = before.kills is not None and now.kills is not None and before.scope == now.scope
    if counted and now.kills > before.kills:  # type: ignore[operator]
        where = "in the step's own memory cgroup" if now.scope != "host" else "on the host (the only counter here)"
        cause = (f"killed by the kernel for lack of memory (OOM killer: {now.kills - before.kills} kill(s) "  # type: ignore[operator]
                 f"{where} during this run)")
    elif counted:
        cause = (f"killed by SIGKILL, but the OOM-kill count of the {now.scope} did not change: something else "
                 "killed it")
    else:
        cause = "killed by SIGKILL; no OOM-kill count could be read to say whether for lack of memory"
    klass = limits.classes.get(memory_class or "")
    need = f", which needs {format_size(klass.need)} a step" if klass else ""
    peak = f"; its resident memory peaked at {format_size(peak_rss)}" if peak_rss else ""
    return (f"step {step_key} (memory class {memory_class or 'untagged'}{need}) was {cause}{peak}. Limits in force: "
            + "; ".join(f"{c.memory_class} {c.limit}" for c in limits.classes.values())
            + f"; budget {format_size(limits.settings.budget)} of {format_size(limits.settings.available)} available. "
              "Lower the concurrency or the batch size, or raise the need of this class "
              f"({env_need(memory_class or 'model')}).")
