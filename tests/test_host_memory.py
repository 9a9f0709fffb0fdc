"""`prefix_jax.host_memory`: when train.py / predict.py restart with `glibc.malloc.hugetlb=1`, and that they do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefix_jax import host_memory

REPO = Path(__file__).resolve().parent.parent
NEW = "glibc 2.36"


@pytest.mark.parametrize("environ, glibc, thp, expected", [
    ({}, NEW, "madvise", host_memory.TUNABLE),
    ({}, "glibc 2.35", "madvise", host_memory.TUNABLE),
    ({}, "glibc 2.34", "madvise", None),  # no such tunable before 2.35
    ({}, None, "madvise", None),  # not glibc (musl, macOS)
    ({}, NEW, "always", None),  # the kernel backs every mapping with huge pages already
    ({}, NEW, "never", None),
    ({}, NEW, None, None),
    ({"PREFIX_JAX_HUGE_PAGES": "0"}, NEW, "madvise", None),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, NEW, "madvise", f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, NEW, "madvise", None),  # the user's choice stands
], ids=["glibc-2.36", "glibc-2.35", "glibc-2.34", "no-glibc", "thp-always", "thp-never", "thp-unknown", "opt-out",
        "keeps-other-tunables", "user-set"])
def test_when_to_restart(environ, glibc, thp, expected):
    assert host_memory.huge_page_tunables(environ, glibc, thp) == expected


_PROBE = ("import os, sys; print('start', os.getpid(), flush=True); from prefix_jax import host_memory; "
          "host_memory.reexec_with_huge_pages(); print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


def probe(**env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, "--flag=1"], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_process_restarts_once_with_the_tunable_same_pid_and_arguments():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    if host_memory.huge_page_tunables(env, host_memory._glibc_version(), host_memory._thp_mode()) is None:
        pytest.skip("this host's glibc or kernel gains nothing from the tunable")
    lines = probe(GLIBC_TUNABLES="", **{host_memory.OPT_OUT: "1"})
    starts = [line for line in lines if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # started twice, as the same process
    assert lines[-1] == f"tunables {host_memory.TUNABLE} ['--flag=1']"
    assert probe(GLIBC_TUNABLES="", **{host_memory.OPT_OUT: "0"})[1:] == ["tunables  ['--flag=1']"]
