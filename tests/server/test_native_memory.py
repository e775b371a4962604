"""Native memory bounds: oneDNN's primitive cache capped unless the operator set it; the
heap trimmed only when the engine is idle after work, at most once per interval."""

from __future__ import annotations

from loramux.server import native_memory
from loramux.server.native_memory import ONEDNN_CACHE_ENV, HeapTrimmer, bound_onednn_cache


def test_onednn_cache_is_capped_unless_set(monkeypatch):
    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    bound_onednn_cache(128)
    assert native_memory.os.environ[ONEDNN_CACHE_ENV] == "128"
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "2048")
    bound_onednn_cache(128)
    assert native_memory.os.environ[ONEDNN_CACHE_ENV] == "2048"


def test_trims_when_idle_after_steps_at_most_once_per_interval():
    now = [0.0]
    trimmer = HeapTrimmer(interval_s=10.0, clock=lambda: now[0])
    calls = []
    trimmer._trim = calls.append  # count calls instead of trimming
    trimmer.idle()
    assert calls == []  # nothing ran yet
    trimmer.stepped()
    now[0] = 5.0
    trimmer.idle()
    assert calls == []  # within the interval
    now[0] = 11.0
    trimmer.idle()
    assert calls == [0]
    now[0] = 30.0
    trimmer.idle()
    assert calls == [0]  # no steps since the last trim
    trimmer.stepped()
    trimmer.idle()
    assert calls == [0, 0] and trimmer.num_trims == 2


def test_trimming_really_calls_glibc_where_there_is_one():
    trimmer = HeapTrimmer(interval_s=0.0)
    trimmer.stepped()
    trimmer.idle()
    assert trimmer.num_trims == (0 if trimmer._trim is None else 1)
