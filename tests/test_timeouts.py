"""ISTIO_EBPF_TIMEOUT_SCALE stretches readiness waits (8 in a TCG kernel-matrix guest)."""

from __future__ import annotations

import pytest

from istio_ebpf_plugin import timeouts
from istio_ebpf_plugin.errors import UsageError


def test_unset_means_real_time(monkeypatch):
    monkeypatch.delenv(timeouts.ENV, raising=False)
    assert timeouts.scaled(10) == 10


def test_scale_multiplies(monkeypatch):
    monkeypatch.setenv(timeouts.ENV, "8")
    assert timeouts.scaled(2.5) == 20


@pytest.mark.parametrize("bad", ["fast", "0.5", "0", "1000", "nan"])
def test_bad_scale_is_a_one_line_usage_error(monkeypatch, bad):
    monkeypatch.setenv(timeouts.ENV, bad)
    with pytest.raises(UsageError) as err:
        timeouts.scaled(1)
    assert "\n" not in str(err.value) and timeouts.ENV in str(err.value)
