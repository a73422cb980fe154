"""Progress bars that suit where the output goes: a live tqdm bar on a terminal, a few plain lines otherwise.

Redirected to a file, tqdm redraws every few milliseconds (a 6-epoch log of megabytes of carriage
returns); `LineProgress` instead prints one line each time another 1/`lines` of the work is done (per
epoch, when the caller passes the number of epochs) and one at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["LineProgress", "progress_bar"]


class LineProgress:
    """tqdm's `update` / `set_postfix` / `close`, printing at most `lines` lines plus a last one."""

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, lines: int = 10,
                 file: TextIO | None = None, unit_scale: bool = False):
        self.total, self.desc, self.unit, self.n = max(int(total), 0), desc, unit, int(initial)
        self.lines, self.file, self.unit_scale = max(int(lines), 1), file or sys.stderr, unit_scale
        self.start, self.postfix, self.closed = time.perf_counter(), "", False
        self.mark = self._mark(self.n)

    def _mark(self, n: int) -> int:
        return n * self.lines // self.total if self.total else 0

    def _count(self, n: float) -> str:
        if self.unit_scale and n >= 1000:
            return f"{n / 1000:.1f}k"
        return f"{int(n)}"

    def _print(self) -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self._count(self.n)}/{self._count(self.total)} {self.unit}{pct}, "
              f"{time.perf_counter() - self.start:.1f} s{post}", file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        mark = self._mark(self.n)
        if mark > self.mark:
            self.mark = mark
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.mark < self.lines:
            self._print()   # the end, unless the last line already said 100%
        self.closed = True


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "step", *, initial: int = 0, lines: int = 10,
                 unit_scale: bool = False, enabled: bool = True, file: TextIO | None = None):
    """A tqdm bar if `file` (stderr) is a terminal, else `LineProgress`; nothing when disabled or not
    process 0 of a multi-host run."""
    import jax
    file = file or sys.stderr
    if not enabled or jax.process_index() != 0:
        return _Silent()
    if getattr(file, "isatty", lambda: False)():
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, file=file,
                    dynamic_ncols=True, smoothing=0.1)
    return LineProgress(total, desc, unit, initial=initial, lines=lines, file=file, unit_scale=unit_scale)
