"""The autoscaler's knobs, with Knative's KPA defaults where it has one.

Windows are in seconds of the clock the caller passes in (``time.monotonic`` in the
runtime; anything monotonic works).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Concurrency is averaged over this long for the normal ("stable") decision: long enough
# that a short lull does not shed replicas that the next second needs again (KPA: 60 s).
DEFAULT_STABLE_WINDOW_S = 60.0
# ...and over this long to notice a burst (KPA: 10% of the stable window).
DEFAULT_PANIC_WINDOW_S = 6.0
# Panic when the short window's load is at least this many times what the ready replicas
# are meant to carry (KPA: 200%). Panicking scales straight to the short window's demand
# and never scales down until the burst has been over for a stable window.
DEFAULT_PANIC_THRESHOLD = 2.0
# A lower recommendation takes effect only once every recommendation of this long has been
# at most that low: the highest recommendation of the last delay wins (KPA's scale-down-delay,
# 0 there by default; here 30 s, since starting a worker costs seconds of model loading).
DEFAULT_SCALE_DOWN_DELAY_S = 30.0
# The last replica goes only after this long without any load (KPA's scale-to-zero grace).
DEFAULT_SCALE_TO_ZERO_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class AutoscaleSettings:
    stable_window_s: float = DEFAULT_STABLE_WINDOW_S
    panic_window_s: float = DEFAULT_PANIC_WINDOW_S
    panic_threshold: float = DEFAULT_PANIC_THRESHOLD
    scale_down_delay_s: float = DEFAULT_SCALE_DOWN_DELAY_S
    scale_to_zero_grace_s: float = DEFAULT_SCALE_TO_ZERO_GRACE_S

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they can be used)."""
        out = []
        for name in ("stable_window_s", "panic_window_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                out.append(f"{name}: must be a positive number of seconds, got {value}")
        if self.panic_window_s > self.stable_window_s:
            out.append(f"panic_window_s ({self.panic_window_s}) must be at most stable_window_s "
                       f"({self.stable_window_s})")
        if not (math.isfinite(self.panic_threshold) and self.panic_threshold > 1):
            out.append(f"panic_threshold: must be a number above 1, got {self.panic_threshold}")
        for name in ("scale_down_delay_s", "scale_to_zero_grace_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                out.append(f"{name}: must be 0 or more seconds, got {value}")
        return out
