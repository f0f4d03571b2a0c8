"""The benchmarks' timing: calls interleaved round by round, slow and failing peers handled."""
import time

import pytest

from nf4kern.benchmarks import common


def _recorder(log: list, name: str, fail_on: int | None = None, sleep_s: float = 0.0):
    calls = []

    def fn():
        calls.append(None)
        log.append(name)
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError(f"{name} broke")
        time.sleep(sleep_s)
    return fn


def test_calls_are_interleaved_after_each_warms_up():
    log = []
    fns = {"a": _recorder(log, "a"), "b": _recorder(log, "b"), "c": _recorder(log, "c")}
    common.time_interleaved(fns, warmup=2, repeat=3)
    assert log == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 3


def test_medians_follow_each_function():
    times = common.time_interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.03)}, warmup=1, repeat=3)
    assert times["slow"] >= 30.0
    assert times["fast"] < times["slow"]


def test_a_slow_function_gets_one_warm_up_and_three_calls():
    log = []
    fns = {"slow": _recorder(log, "slow", sleep_s=0.02), "quick": _recorder(log, "quick")}
    common.time_interleaved(fns, warmup=4, repeat=6, slow_ms=10.0)
    assert log.count("slow") == 1 + 3 and log.count("quick") == 4 + 6
    assert log[5:] == ["slow", "quick"] * 3 + ["quick"] * 3


def test_a_failing_function_reports_its_error_and_the_others_go_on():
    log = []
    fns = {"bad": _recorder(log, "bad", fail_on=3), "good": _recorder(log, "good")}
    times = common.time_interleaved(fns, warmup=1, repeat=4)
    assert isinstance(times["bad"], RuntimeError) and "bad broke" in str(times["bad"])
    assert isinstance(times["good"], float)
    assert log.count("bad") == 3 and log.count("good") == 1 + 4
    assert list(times) == ["bad", "good"]


def test_time_ms_raises_what_the_function_raised():
    def broken():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        common.time_ms(broken, warmup=1, repeat=2)


def test_repeat_must_be_positive():
    with pytest.raises(ValueError, match="repeat"):
        common.time_interleaved({"a": lambda: None}, warmup=1, repeat=0)
