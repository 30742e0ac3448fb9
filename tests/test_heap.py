"""The calibration passes' heap: freed MiB-sized tensors go back to the system."""

import platform
import subprocess
import sys

# A mapped block of 30 MiB freed raises glibc's mmap threshold to it; then 100 blocks of
# 4 MiB, each beside a small tensor that lives on, come from the heap unless the threshold
# is fixed. Prints the share of their 400 MiB that freeing them gives back.
PROBE = """
import sys, torch
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
if sys.argv[1] == "bound":
    from pissa_rs.engine.heap import bound_heap
    assert bound_heap()
torch.empty(30 << 20, dtype=torch.uint8).fill_(1)
keep, big = [], []
for _ in range(100):
    big.append(torch.empty(4 << 20, dtype=torch.uint8).fill_(1))
    keep.append(torch.ones(64))
before = rss()
big.clear()
print((before - rss()) / (400 << 20))
"""


def given_back(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def test_a_bound_heap_gives_freed_tensors_back_where_glibc_would_keep_them():
    from pissa_rs.engine.heap import bound_heap

    if platform.libc_ver()[0] != "glibc":  # nothing to bound: the call says so and changes nothing
        assert bound_heap() is False
        return
    assert given_back("free") < 0.2  # the probe does show what glibc keeps
    assert given_back("bound") > 0.9
