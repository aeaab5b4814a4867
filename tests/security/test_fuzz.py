"""A short structure-aware fuzz of every RPC against a live broker (the long run: ``python -m bench --only fuzz``).

Derandomized, so CI sees the same inputs every run; a failure names the method, status and reason, never the input
(it may hold canary-like text).
"""

from __future__ import annotations

from pathlib import Path

from tests.pki import make_test_pki
from tests.security.fuzzing import METHODS, fuzz_method, fuzzed_broker

EXAMPLES_PER_METHOD = 24


def test_no_fuzzed_request_makes_the_broker_fail_internally(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path)
    with fuzzed_broker(tmp_path, pki) as (client, names):
        for method in METHODS:
            fuzz_method(client, method, names, EXAMPLES_PER_METHOD)
        healthy = client.healthy()
    outcomes = client.outcomes
    assert outcomes.inputs >= EXAMPLES_PER_METHOD * len(METHODS) // 2  # hypothesis may stop early on small spaces
    assert outcomes.failures == []
    assert healthy
    # The inputs did reach past the transport: most were refused on purpose, each with its own status.
    assert outcomes.codes["INVALID_ARGUMENT"] > 0 and len(outcomes.codes) >= 3
