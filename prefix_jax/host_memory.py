"""Host memory for XLA's CPU backend: large malloc'd buffers on transparent huge pages.

XLA's CPU client allocates a step's temporaries afresh on every execution (1.4 GiB for a GPT-2-small
training step at batch 8). glibc maps each buffer above 32 MiB with `mmap` and unmaps it when freed, so
every step faults all those pages in again, 4 KiB at a time: ~400,000 page faults and an eighth of the
step's CPU time in the kernel. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask for
transparent huge pages (2 MiB) where the kernel leaves that to the program (THP mode `madvise`, the common
default), which removes >99% of the faults. Tunables are read when a process starts, so
`reexec_with_huge_pages` restarts the process once (same pid, arguments and environment, plus the tunable)
at the top of train.py and predict.py. Nothing computed changes; `PREFIX_JAX_HUGE_PAGES=0` turns it off.
Only the standard library is imported here: the restart happens before JAX is loaded.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "PREFIX_JAX_HUGE_PAGES"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_tunables(environ: Mapping[str, str], glibc_version: str | None, thp_mode: str | None) -> str | None:
    """The `GLIBC_TUNABLES` value to restart with, or None when a restart would not help or is not wanted.

    `glibc_version` as `os.confstr("CS_GNU_LIBC_VERSION")` gives it ("glibc 2.36"; None: not glibc);
    `thp_mode` the kernel's transparent-huge-page mode (`always`, `madvise`, `never`; None: unknown).
    """
    if environ.get(OPT_OUT, "1") == "0" or thp_mode != "madvise":  # `always`: the kernel does it already
        return None
    version = re.fullmatch(r"glibc (\d+)\.(\d+).*", glibc_version or "")
    if version is None or (int(version.group(1)), int(version.group(2))) < (2, 35):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:  # set by the user (or by our restart): theirs stands
        return None
    return f"{current}:{TUNABLE}" if current else TUNABLE


def _glibc_version() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return None


def _thp_mode() -> str | None:
    try:
        with open(_THP_ENABLED) as f:
            chosen = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return chosen.group(1) if chosen else None


def reexec_with_huge_pages() -> None:
    """Restarts this process with `glibc.malloc.hugetlb=1` when that helps (see the module doc); else returns.

    Call first thing in a program's `__main__`, before threads or JAX exist. If the restart fails, the
    program goes on as it is.
    """
    if not sys.platform.startswith("linux"):
        return
    tunables = huge_page_tunables(os.environ, _glibc_version(), _thp_mode())
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
    except OSError:
        return


def status() -> str:
    """One line for the run's log: whether malloc uses huge pages in this process."""
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return (f"host malloc: transparent huge pages (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}; "
                f"{OPT_OUT}=0 turns this off)")
    return "host malloc: glibc defaults (no huge pages)"
