"""A pytest plugin (`-p cuda_select`, gpu/ on PYTHONPATH) that keeps the tests meant for a GPU:
those skipped without CUDA (a skipif whose reason names CUDA or a GPU) and those
parametrized with a CUDA device. The rest of the suite assumes or tests the CPU default and
has its own runs; deselected, it costs nothing on the GPU machine."""

from __future__ import annotations

import re

_CUDA = re.compile(r"\b(CUDA|GPU)s?\b", re.I)


def needs_cuda(item) -> bool:
    for mark in item.iter_markers("skipif"):
        if _CUDA.search(str(mark.kwargs.get("reason", ""))):
            return True
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return any(str(v) == "cuda" or str(v).startswith("cuda:") for v in params)


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_cuda(item)]
    dropped = [item for item in items if not needs_cuda(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_report_header(config):
    return "cuda_select: only the tests meant for a GPU (skipped without CUDA, or on a CUDA device)"
