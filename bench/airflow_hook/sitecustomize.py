"""Benchmark-only: time each ``mailroom.pipeline`` stage inside Airflow's task processes.

``bench/e2e_airflow.py`` puts this folder on the ``PYTHONPATH`` of the Airflow it starts and
names a file in ``MAILROOM_BENCH_TIMINGS``. When a task process imports ``mailroom.pipeline``
each stage function is wrapped to append one JSON line
there: the function, its shard, wall-clock start and end (``time.time()``, comparable with
Airflow's task instance dates), and the process's RSS before and its peak (``VmHWM``) after.
Nothing else changes; without the variable this file does nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import sys
import time

_TIMINGS = os.environ.get("MAILROOM_BENCH_TIMINGS")
# The module each task body calls into (``src/mailroom_airflow/tasks.py``): every function it
# exports (``__all__``) is named like the task that calls it.
_WRAP = "mailroom.pipeline"


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fp:
            for line in fp:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        rss = _status_mb("VmRSS:")
        start = time.time()
        outcome = "error"
        try:
            value = fn(*args, **kwargs)
            outcome = "ok"
            return value
        finally:
            record = {
                "stage": name,
                "shard": kwargs.get("shard"),
                "pid": os.getpid(),
                "start": start,
                "end": time.time(),
                "rss_before_mb": rss,
                "peak_rss_mb": _status_mb("VmHWM:"),
                "outcome": outcome,
            }
            with open(_TIMINGS, "a") as fp:
                fp.write(json.dumps(record) + "\n")

    return wrapper


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        for name in module.__all__:
            if inspect.isfunction(getattr(module, name)):
                setattr(module, name, _timed(name, getattr(module, name)))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _WRAP:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _TIMINGS and not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
