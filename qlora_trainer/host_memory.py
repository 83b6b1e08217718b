"""Host (CPU) memory of a run, phase by phase: the peak resident memory of each phase, from the kernel's own counters.

    memory = HostMemory(log)          # the "imports" phase ends here: whatever the process did before
    ...; memory.end_phase("data")     # one line per phase, and the phase's numbers kept
    memory.write(OUT / "host_memory.json")

Linux only (/proc/self/status). The peak is VmHWM, the high-water mark of the resident set (anonymous memory and
file pages, e.g. memory-mapped safetensors, both count). Writing "5" to /proc/self/clear_refs resets it to the
current resident set, so each phase's peak is its own; where that write is refused (an old kernel, a locked-down
container) the peak is the process's peak so far, and `per_phase` in the JSON says so. At the end of each phase the
current resident set and its anonymous part (RssAnon: heap, torch tensors; what no page cache can take back) are
kept too. Elsewhere (macOS, Windows) nothing is measured and nothing is logged.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_trainer import atomic

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_HWM = "5"  # clear_refs: reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
MIB = 2**20


def read_status(path: Path = STATUS) -> dict[str, int] | None:
    """VmHWM, VmRSS, RssAnon, RssFile of /proc/self/status in bytes; None where there is no such file."""
    try:
        text = path.read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024  # the kernel writes kB (KiB)
    return values if "VmHWM" in values and "VmRSS" in values else None


_peak_before_resets = 0  # the highest VmHWM seen before a reset_peak: the process's peak lives on here


def reset_peak() -> bool:
    """Set VmHWM (and with it getrusage's ru_maxrss) back to the current RSS; False where the kernel refuses."""
    global _peak_before_resets
    status = read_status()
    if status is None:
        return False
    try:
        CLEAR_REFS.write_text(RESET_HWM)
    except OSError:
        return False
    _peak_before_resets = max(_peak_before_resets, status["VmHWM"])
    return True


def process_peak_bytes() -> int:
    """The peak resident memory of the whole process, resets by reset_peak included (ru_maxrss alone would forget
    what came before the last reset)."""
    status = read_status()
    if status is None:  # ru_maxrss: bytes on macOS, KiB elsewhere; no resource module on Windows
        try:
            import resource
        except ImportError:
            return 0
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024
    now = status["VmHWM"]
    return max(now, _peak_before_resets)


@dataclass
class Phase:
    name: str
    peak_mib: float  # the highest resident set during the phase (per_phase=False: since the process started)
    start_mib: float  # resident set when the phase began
    end_mib: float  # resident set when it ended
    anon_mib: float  # of which anonymous memory, at the end
    seconds: float

    @property
    def added_mib(self) -> float:
        """How far the phase rose above where it started, at its peak."""
        return self.peak_mib - self.start_mib

    def line(self) -> str:
        return (f"host memory: {self.name:<12} peak {self.peak_mib:7.0f} MiB (+{max(self.added_mib, 0):.0f}), "
                f"now {self.end_mib:.0f} MiB (anon {self.anon_mib:.0f})")


class HostMemory:
    """The phases of one process, in order. Creating it ends the "imports" phase (process start until now)."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self.log = log
        self.phases: list[Phase] = []
        status = read_status()
        self.enabled = status is not None
        self.per_phase = False
        self._start = time.perf_counter()
        if not self.enabled:
            return
        first = Phase("imports", status["VmHWM"] / MIB, 0.0, status["VmRSS"] / MIB,
                      status.get("RssAnon", 0) / MIB, 0.0)
        self._record(first)
        self.per_phase = reset_peak()
        self._start_mib = status["VmRSS"] / MIB

    def end_phase(self, name: str) -> Phase | None:
        """Close the phase that began at the last end_phase (or at creation): log its line, keep it, start the next."""
        status = read_status() if self.enabled else None
        if status is None:
            return None
        now = time.perf_counter()
        phase = Phase(name, status["VmHWM"] / MIB, self._start_mib, status["VmRSS"] / MIB,
                      status.get("RssAnon", 0) / MIB, round(now - self._start, 3))
        self._record(phase)
        if self.per_phase:
            reset_peak()
        self._start, self._start_mib = time.perf_counter(), self._rss_mib()
        return phase

    def peak_mib(self) -> float:
        """The highest resident set of the process over every phase so far (0 when nothing is measured)."""
        return max((p.peak_mib for p in self.phases), default=0.0)

    def to_dict(self) -> dict:
        return {"unit": "MiB", "per_phase": self.per_phase, "peak_mib": round(self.peak_mib(), 1),
                "phases": [{k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(p).items()}
                           for p in self.phases]}

    def write(self, path: Path) -> None:
        """The phases so far as JSON (atomically: a reader never sees half a file); nothing when not measured."""
        if self.enabled:
            atomic.write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def _record(self, phase: Phase) -> None:
        self.phases.append(phase)
        if self.log is not None:
            self.log(phase.line())

    def _rss_mib(self) -> float:
        status = read_status()
        return status["VmRSS"] / MIB if status else 0.0
