"""The benchmarks' one error class: a benchmark that cannot run as asked, with what to do about it."""

from __future__ import annotations


class BenchmarkError(Exception):
    """A benchmark cannot run (bad option, mismatched bundle, unreadable result file); the message says why
    and what to do. The CLI maps it to exit code 2."""
