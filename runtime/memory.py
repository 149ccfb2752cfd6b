"""Resident memory of this process, per phase: the peak (resettable high-water mark) and, where the kernel tells,
the private (anonymous) share, which is what a memory-mapped weight file does not count against.

Used by calibration (per-phase peaks in the manifest) and the benchmarks. Linux /proc where present; elsewhere
the process lifetime's ru_maxrss.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")
_STATUS = Path("/proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux: "5" > /proc/self/clear_refs). False where the
    platform cannot, and the peak read afterwards is then the process lifetime's."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def status_kb(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, RssFile...); None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def private_mb() -> float | None:
    """This process's resident private memory in MiB (RssAnon: heap, arenas, copied weights; what a process
    cannot share or drop without swapping); None where /proc does not tell."""
    kb = status_kb("RssAnon")
    return None if kb is None else kb / 1024.0


def file_backed_mb() -> float | None:
    """This process's resident file-backed memory in MiB (RssFile: mapped files, memory-mapped weights and the
    libraries; pages the kernel can drop and read again from the file); None where /proc does not tell."""
    kb = status_kb("RssFile")
    return None if kb is None else kb / 1024.0


def _ru_maxrss_kb() -> int:
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return raw // 1024 if sys.platform == "darwin" else raw  # bytes on macOS, KiB on Linux


def peak_rss_mb() -> float:
    """The resident high-water mark in MiB: VmHWM where /proc has it (resettable), else ru_maxrss (lifetime)."""
    kb = status_kb("VmHWM")
    return (_ru_maxrss_kb() if kb is None else kb) / 1024.0


def lifetime_peak_rss_mb() -> float:
    """ru_maxrss: the process lifetime's peak in MiB (never reset; the phase peaks are the finer figure)."""
    return _ru_maxrss_kb() / 1024.0


@contextmanager
def rss_phase() -> Iterator[dict]:
    """Measure one phase's peak resident memory. Yields a dict that, on exit, holds ``peak_mb`` (the high-water
    mark reached inside the phase, the memory held when it began included), ``end_mb`` (resident at exit, where
    /proc tells), ``end_private_mb`` (the anonymous part of it: not file-backed, so not mapped weights) and
    ``scope``: "phase" when the kernel's high-water mark could be reset at entry, "process lifetime" otherwise
    (then ``peak_mb`` may come from an earlier phase)."""
    scoped = _reset_peak_rss()
    record: dict = {}
    yield record
    end_kb = status_kb("VmRSS")
    record.update(peak_mb=peak_rss_mb(), end_mb=None if end_kb is None else end_kb / 1024.0,
                  end_private_mb=private_mb(), scope="phase" if scoped else "process lifetime")


def available_bytes() -> int:
    """Memory the kernel says a new allocation can have without swapping (MemAvailable: free memory plus
    reclaimable page cache); the free pages elsewhere."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
