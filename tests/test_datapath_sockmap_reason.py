"""The sockmap self-test's reason is bounded: it goes into logs, Events and metrics.

On 5.10 and 6.1 (kernel matrix) the FIONREAD reader failed on every read and the reason
listed each one: 39 million characters. These feed the same shapes of results.
"""

from __future__ import annotations

from istio_ebpf_plugin.datapath.selftest.sockmap_check import MAX_REASON_CHARS, SuiteReport, bound_reason


def _result(size: int, reader: str, problems: list[str], seconds: float = 0.01) -> dict:
    return {"size": size, "mode": "close", "reader": reader, "seconds": seconds, "problems": problems}


def test_reason_of_millions_of_failed_reads_is_short_distinct_and_counted():
    flood = ["FIONREAD 0 with data readable"] * 1_000_000        # the old per-read list
    results = [_result(size, "fionread", flood) for size in (1, 1000, 65536)]
    results += [_result(size, "splice", [f"got 0 of {size} bytes"]) for size in (1, 1000, 65536, 1 << 20)]
    results += [_result(16384, "recv", []) for _ in range(20)]
    reason = SuiteReport(results).reason()
    assert len(reason) <= MAX_REASON_CHARS and "\n" not in reason
    assert reason.startswith("7 of 27 transfers failed")
    # distinct failures, each once, with how often it happened
    assert reason.count("FIONREAD 0 with data readable") == 1 and "(x3)" in reason
    assert reason.count("splice: got 0 of") == 1 and "(x4)" in reason


def test_reason_counts_slow_transfers_and_bounds_many_distinct_problems():
    results = [_result(i, "recv", [f"problem kind {chr(65 + i % 26) * 40}"]) for i in range(500)]
    results.append(_result(8 << 20, "recv", [], seconds=2.5))
    reason = SuiteReport(results).reason()
    assert len(reason) <= MAX_REASON_CHARS and reason.endswith("...")
    slow_only = SuiteReport([_result(1, "recv", [], seconds=1.5), _result(2, "recv", [])]).reason()
    assert slow_only == "1 of 2 transfers failed: 1 slower than 1 s (max 1.5 s)"


def test_reason_when_nothing_failed_or_ran():
    assert SuiteReport([_result(1, "recv", [])]).reason() == "all transfers correct"
    assert SuiteReport([]).reason() == "no transfer completed"


def test_bound_reason_is_one_line():
    assert bound_reason("a\nb  c") == "a b c"
    long = bound_reason("x" * 10_000)
    assert len(long) == MAX_REASON_CHARS and long.endswith("...")

