"""The result type that every benchmark module returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Ratio:
    """One measurement: trekeys against a reference, measured in the same run.

    Attributes:
        name: what was measured.
        measured: the trekeys figure, in `unit`.
        reference: the reference tool's figure, in `unit`.
        unit: for example "MiB/s", "s" or "MiB".
        ratio: measured / reference, or the figure the target is stated in.
        target: a sentence such as "ratio >= 0.25".
        passed: whether the target is met.
    """

    name: str
    measured: float
    reference: float
    unit: str
    ratio: float
    target: str
    passed: bool
