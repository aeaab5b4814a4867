"""The long fuzz run: ≥ 100,000 structure-aware requests over every RPC against a live broker.

Same strategies and broker as tests/security/test_fuzz.py (tests/security/fuzzing.py), but random (the seed is in
the figure's details, to reproduce a run) and about 330 times longer. Figures: inputs tried, INTERNAL responses
(target 0), crashes (target 0: the broker stopped answering), and whether its health check says SERVING at the end.
"""

from __future__ import annotations

import secrets

from bench.harness import Run
from bench.report import FigureResult, Target
from tests.security.fuzzing import METHODS, fuzz_method, fuzzed_broker

INPUTS = 100_100
QUICK_INPUTS = 650


def fuzz(run: Run) -> FigureResult:
    result = FigureResult("fuzz")
    per_method = -(-run.count(INPUTS, QUICK_INPUTS) // len(METHODS))
    seed = secrets.randbelow(2**32)
    directory = run.workdir / "fuzz"
    directory.mkdir()
    crashed = 0
    with fuzzed_broker(directory, run.pki) as (client, names):
        for method in METHODS:
            fuzz_method(client, method, names, per_method, seed=seed)
            if not client.healthy():
                crashed += 1
        healthy = client.healthy()
    outcomes = client.outcomes
    result.setup = (
        f"{len(METHODS)} RPCs, {per_method:,} generated requests each (hypothesis strategies from the request "
        "descriptors), one in-process broker over mTLS; mail servers unreachable by design (SSRF guard)"
    )
    result.add("inputs tried", outcomes.inputs, "", Target(">=", run.count(100_000, QUICK_INPUTS)))
    result.add("INTERNAL responses", outcomes.internal, "", Target("==", 0))
    result.add("crashes", crashed, "", Target("==", 0))
    result.add("healthy at the end", 1 if healthy else 0, "", Target("==", 1))
    result.details["seed"] = seed
    result.details["status_codes"] = dict(outcomes.codes)
    result.details["failures"] = [f"{method} {code} {reason}" for method, code, reason in outcomes.failures[:50]]
    return result
