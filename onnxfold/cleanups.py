"""Every clean-up by name, in the order they run, and which of them `--only/--skip` keep.

Clean-ups run before the rules and after each round of them, until neither changes the
graph: they remove the shapes exports hide patterns behind (normalize.py), nodes that
compute nothing (noops.py), and what is computed or stored twice (cse.py).
"""

from __future__ import annotations

from . import cse, noops, normalize
from .normalize import Cleanup
from .runtime_forms import write_runtime_forms
from .sibling_matmuls import merge_sibling_matmuls, NAME as SIBLING_MATMULS, SUMMARY as SIBLING_SUMMARY
from .sums import unstack_sums

STACKED_SUMS = Cleanup("stacked-sums", "torch.stack(terms).sum(0) (Unsqueeze, Concat, ReduceSum) is a Sum",
                       lambda graph, names: unstack_sums(graph))
# Run once the rules are done (optimize.py): the rules match the forms the exporters write.
LATE = [Cleanup("gelu", "a decomposed GELU becomes the form onnxruntime fuses (Gelu from opset 20)",
                lambda graph, names: write_runtime_forms(graph, names, ("gelu",))["gelu"]),
        Cleanup("global-average-pool", "a ReduceMean over the spatial axes of a 4-D tensor is a "
                "GlobalAveragePool", lambda graph, names: write_runtime_forms(
                    graph, names, ("global-average-pool",))["global-average-pool"]),
        Cleanup(SIBLING_MATMULS, SIBLING_SUMMARY, merge_sibling_matmuls)]
CLEANUPS = [*normalize.STEPS, *noops.STEPS, *cse.STEPS, STACKED_SUMS, *LATE]
NAMES = [step.name for step in CLEANUPS]


def select_cleanups(only=None, skip=None) -> list:
    """The clean-ups to run: those `only` names, or all when it names none (rules need
    them to see their patterns: `--only fold-bn-into-conv` keeps every clean-up);
    less those `skip` names. Unknown names are select_rules' to refuse."""
    chosen = [step for step in CLEANUPS if step.name in (only or ())] or CLEANUPS
    return [step for step in chosen if step.name not in (skip or ())]
