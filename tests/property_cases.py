"""Counter of generated property-test cases: hypothesis examples actually run.

``conftest.py`` wraps every collected @given test so that each example it runs
calls ``count_case()`` (through hypothesis' reassignable ``.hypothesis.inner_test``,
so the property tests themselves need no change), and prints the total, and how
many counting tests failed, in the terminal summary:
``property cases: N generated, V violations (in T property tests)``.
Examples rejected before the test body runs (filtered or oversized draws) are not
counted; shrinking runs after a failure are.
"""

from __future__ import annotations

#: examples run, per test node id
GENERATED: dict[str, int] = {}
#: node ids of counting tests that failed (a property violated)
VIOLATIONS: set[str] = set()
#: node id of the test running now (set by conftest's runtest hook)
CURRENT: list[str] = [""]


def count_case() -> None:
    """Count one generated case of the property test running now."""
    node = CURRENT[0]
    GENERATED[node] = GENERATED.get(node, 0) + 1


def total() -> int:
    return sum(GENERATED.values())
