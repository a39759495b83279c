"""pass@k by execution, with the unbiased estimator of Chen et al. (2021, "Evaluating Large Language
Models Trained on Code", eq. 1).

With n sampled completions per problem of which c pass the tests,
``pass@k = 1 - C(n - c, k) / C(n, k)``, computed as the numerically stable product
``1 - prod_{i = n-c+1}^{n} (1 - k / i)``, then averaged over problems. With greedy decoding (n = 1)
pass@1 is the share of problems whose completion passes. ``evaluation.num_samples`` sets n; k > n is
an error. Programs are built and executed by ``mtpeft.metrics.code_exec`` (one sandboxed process per
program, several at once), reached only through ``execute``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtpeft.data.records import Record
from mtpeft.metrics.base import PerExampleMetric, check_lengths
from mtpeft.metrics.code_exec import PassAtOne, passes


def execute(completions: Sequence[str], records: Sequence[Record], executor: PassAtOne | None) -> list[bool]:
    """Whether each completion passes its record's tests (one bool per pair): the executor adapter."""
    return passes(completions, records, executor)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(
            f"pass@{k} needs at least {k} samples per problem, got {n}: set evaluation.num_samples >= {k}"
        )
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class PassAtK(PerExampleMetric):
    """pass@k of every record's sampled completions (``predictions[i]``: a list of n >= k strings)."""

    uses_samples = True

    def __init__(self, k: int = 1, executor: PassAtOne | None = None) -> None:
        if k < 1:
            raise ValueError(f"pass@k needs k >= 1, got {k}")
        super().__init__()
        self.k = k
        self.name = f"pass@{k}"
        self.executor = executor

    def score(self, predictions: Sequence[Sequence[str] | str], records: Sequence[Record]) -> list[float]:
        check_lengths(self.name, predictions, records)
        samples = [[p] if isinstance(p, str) else list(p) for p in predictions]
        fewest = min((len(group) for group in samples), default=self.k)
        if fewest < self.k:  # before running anything
            raise ValueError(
                f"{self.name} needs at least {self.k} samples per problem, got {fewest}: "
                f"set evaluation.num_samples >= {self.k}"
            )
        owners = [i for i, group in enumerate(samples) for _ in group]
        ok = execute([s for group in samples for s in group], [records[i] for i in owners], self.executor)
        correct = [0] * len(samples)
        for i, passed in zip(owners, ok, strict=True):
            correct[i] += int(passed)
        return [pass_at_k(len(group), c, self.k) for group, c in zip(samples, correct, strict=True)]
