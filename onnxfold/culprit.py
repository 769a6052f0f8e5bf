"""`optimize --verify`: check parity, and when it fails, find the rule that broke it."""

from __future__ import annotations

import dataclasses

from .optimize import optimize, select_passes
from .verify import VerifySettings, verify_models


def verify_optimization(original, optimized, rules, report, freeze_weight_inputs=False,
                        parity: VerifySettings | None = None, cleanups=None) -> dict:
    """Parity of `optimized` against `original`; on failure, name the rules to blame.

    `parity`: how to compare (shapes, inputs, tolerances, ...), as `verify` takes it; its
    latency setting is ignored, since only parity counts here.
    A rule is blamed when optimizing without it (and with every other rule) passes.
    """
    parity = dataclasses.replace(parity or VerifySettings(), latency=False)
    check = verify_models(original, optimized, parity)
    result = {"passed": check.passed, "parity": check.to_dict(), "culprits": []}
    if check.passed:
        return result
    for name in report.fired():
        without = [rule for rule in rules if rule.name != name]
        passes = [(pass_name, run) for pass_name, run in select_passes() if pass_name != name]
        candidate, _ = optimize(original, rules=without, freeze_weight_inputs=freeze_weight_inputs,
                                cleanups=cleanups, passes=passes)
        if verify_models(original, candidate, parity).passed:
            result["culprits"].append(name)
    return result
