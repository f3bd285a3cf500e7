"""Keep every CPU core busy while a test runs, as CI's machine often is.

Results must not depend on the machine's load (no timing-based choice may change numerics), so
the determinism and kill/resume tests run inside `busy_cores()`: one spinning process per core,
started before the block and killed after it, whatever happens inside.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# pure-Python arithmetic: holds a core without touching the disk or much memory
_SPIN = "import itertools\nx = 0\nfor i in itertools.count():\n    x = (x * 31 + i) % 1000003\n"


@contextlib.contextmanager
def busy_cores(n: int | None = None) -> Iterator[list[subprocess.Popen]]:
    """`n` processes (default: one per core) spinning until the block ends."""
    count = n if n is not None else (os.cpu_count() or 1)
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
