"""Timing protocol for the CPU benchmarks: interleaved, warmed up, repeated until stable, and
honest about other work on the machine.

* :func:`time_interleaved` times several implementations of one computation in the same
  process, alternating them inside every repetition (the order rotated each time), after a
  warm-up of each, until every median is known to within a tolerance (or a cap on repetitions / seconds); it
  returns every sample, so callers print min / median / max.
* Each implementation is a list of zero-argument calls, one per *layer*. ``cold=False``
  ("warm"): every timed chunk reuses layer 0, after one untimed call, so its weights are as
  warm as the caches allow (back-to-back calls on the same weights). ``cold=True`` ("model"):
  one cursor walks through the layers across ALL implementations, so consecutive calls never
  touch the same layer and a layer comes back only after every other layer of the stack
  was read: with a stack larger than the last-level cache each call finds its weights out
  of cache, as each layer of a model does during decode.
* :class:`LoadMonitor` reads the load average (``os.getloadavg``) against the core count
  and, on Linux, the CPU time other processes used during the run (``/proc/stat`` minus
  this process); :meth:`LoadMonitor.warning` says when that other work makes the numbers
  noisy.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

# Other work worth a warning, in cores busy (load average, or CPU time / wall time).
OTHER_WORK_WARN = 0.3


def device_model(device: str = "cpu") -> str:
    """What benchmark headers name the machine by: the GPU's name for a CUDA device, else the
    CPU's model (Linux's /proc/cpuinfo, else what ``platform`` knows)."""
    if str(device).startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache (sysfs), ``default`` when it cannot be read."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or default


def _proc_stat_busy() -> Optional[float]:
    """Seconds of CPU time all processes used since boot (busy = all but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def load_average() -> Optional[tuple]:
    try:
        return os.getloadavg()
    except OSError:
        return None


class LoadMonitor:
    """Other work on the machine before and during a benchmark run."""

    def __init__(self, threads: int):
        self.threads = threads
        self.cores = os.cpu_count() or 1
        self.load_start = load_average()
        self._busy0, self._self0, self._wall0 = _proc_stat_busy(), time.process_time(), time.perf_counter()
        self.load_end: Optional[tuple] = None
        self.others_cores: Optional[float] = None

    def start_warning(self) -> Optional[str]:
        if self.load_start is None or self.load_start[0] < OTHER_WORK_WARN:
            return None
        return (f"WARNING: load average {self.load_start[0]:.2f} (1 min) on {self.cores} cores before this "
                f"benchmark started: other work may be running (the end of the run says whether it did), "
                f"which makes timings noisy and slower (ratios suffer less, being interleaved)")

    def stop(self) -> dict:
        busy1, self1, wall1 = _proc_stat_busy(), time.process_time(), time.perf_counter()
        self.load_end = load_average()
        if busy1 is not None and self._busy0 is not None and wall1 > self._wall0:
            self.others_cores = max(0.0, ((busy1 - self._busy0) - (self1 - self._self0)) / (wall1 - self._wall0))
        return self.summary()

    def summary(self) -> dict:
        return {"cores": self.cores, "threads": self.threads, "loadavg_start": self.load_start,
                "loadavg_end": self.load_end, "others_busy_cores": self.others_cores}

    def describe(self) -> str:
        parts = []
        if self.load_start is not None:
            parts.append(f"load average {self.load_start[0]:.2f} at start")
        if self.load_end is not None:
            parts.append(f"{self.load_end[0]:.2f} at end (this benchmark adds up to {self.threads})")
        if self.others_cores is not None:
            parts.append(f"other processes used {self.others_cores:.2f} of {self.cores} cores during the run")
        return "; ".join(parts) or "load unknown"

    def warning(self) -> Optional[str]:
        """A warning line when other work ran during the run, else None.

        The CPU time other processes used during the run (/proc/stat) decides when it could be
        measured: the 1-minute load average decays slowly and still counts work that ended
        before the run. Without /proc/stat the load averages stand in."""
        if self.others_cores is not None:
            others = [self.others_cores]
        else:
            others = [v for v in (self.load_start[0] if self.load_start else None,
                                  (self.load_end[0] - self.threads) if self.load_end else None) if v is not None]
        if not others or max(others) < OTHER_WORK_WARN:
            return None
        hint = ""
        if self.threads > 1 and max(others) >= 0.5:
            hint = (f"; with {self.threads} threads every parallel region also waits for a thread that the "
                    f"other work descheduled (--threads 1 suffers less)")
        return (f"WARNING: other work on this machine ({self.describe()}): absolute times are noisy; "
                f"rerun on a quiet machine before quoting them{hint}")


def median_ci_halfwidth(samples: List[float]) -> float:
    """Half the width of a distribution-free ~95% confidence interval of the median (order
    statistics n/2 -+ 0.98 sqrt(n)), relative to the median; the whole range below 6 samples."""
    s = sorted(samples)
    n = len(s)
    k = max(0, int((n - 1.96 * math.sqrt(n)) / 2))
    med = statistics.median(s)
    return (s[n - 1 - k] - s[k]) / 2 / med if med > 0 else float("inf")


def time_interleaved(impls: Dict[str, Sequence[Callable[[], object]]], *, cold: bool, min_time: float = 0.02,
                     warmup: float = 0.1, min_repeats: int = 5, max_repeats: int = 25, tol: float = 0.03,
                     max_seconds: float = 10.0) -> dict:
    """Seconds per call of each implementation, interleaved; see the module docstring.

    impls: name -> one call per layer (all the same length when ``cold``). Each repetition
    times every implementation once, in an order rotated by one each repetition, a chunk of
    calls long enough to take ``min_time``. Stops after ``min_repeats`` repetitions once every
    implementation's median is known to within ``tol`` (:func:`median_ci_halfwidth`), or at
    ``max_repeats`` / after ``max_seconds`` (at least ``min(3, max_repeats)`` repetitions);
    "stable" says which.

    Returns {"samples": name -> [seconds per call, one per repetition], "repeats", "stable",
    "chunk": name -> calls per timed chunk}.
    """
    names = list(impls)
    n_layers = {name: len(fns) for name, fns in impls.items()}
    cursor = 0
    min_repeats = max(1, min(min_repeats, max_repeats))

    def run(name: str, count: int) -> float:
        """Time ``count`` calls of ``name``; returns seconds per call."""
        nonlocal cursor
        fns = impls[name]
        if cold:
            L = n_layers[name]
            calls = [fns[(cursor + i) % L] for i in range(count)]
            cursor += count
        else:
            fns[0]()                      # untimed: this chunk runs on warm weights
            calls = [fns[0]] * count
        t0 = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - t0) / count

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        chunk = {}
        for name in names:               # warm-up: at least two calls and `warmup` seconds each
            t_end = time.perf_counter() + warmup
            run(name, 1)
            per_call = run(name, 1)
            while time.perf_counter() < t_end:
                per_call = run(name, 1)
            chunk[name] = max(1, math.ceil(min_time / max(per_call, 1e-9)))
        samples: Dict[str, List[float]] = {name: [] for name in names}
        t_start = time.perf_counter()
        stable = False
        rep = 0
        while rep < max_repeats:
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                samples[name].append(run(name, chunk[name]))
            rep += 1
            if rep >= min_repeats and all(median_ci_halfwidth(s) <= tol for s in samples.values()):
                stable = True
                break
            if time.perf_counter() - t_start > max_seconds and rep >= min(3, max_repeats):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"samples": samples, "repeats": rep, "stable": stable, "chunk": chunk}


def spread(samples: List[float]) -> tuple:
    """(min, median, max) of a list of samples."""
    return min(samples), statistics.median(samples), max(samples)
