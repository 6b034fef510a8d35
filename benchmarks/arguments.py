"""Command-line value types the benchmarks share, so that a count that cannot work (no
steps, no rounds, a negative batch) is refused by argparse in one line instead of failing
deep inside a run or printing a meaningless ratio."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse `type`: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse
