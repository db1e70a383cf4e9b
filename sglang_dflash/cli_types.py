"""Argument types shared by the ``sglang-dflash`` subcommands."""

from __future__ import annotations

import argparse
from typing import Callable


def int_list(minimum: int, what: str, distinct_sorted: bool = False) -> Callable[[str], list[int]]:
    """An argparse ``type`` for "1,8,32": integers >= ``minimum``, each error naming ``what``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}")
        return sorted(set(values)) if distinct_sorted else values

    return parse
