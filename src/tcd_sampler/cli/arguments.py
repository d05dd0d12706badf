"""The command line's building blocks: the program name, the one-line error format, an argument parser that uses
it, and the argparse ``type`` converters that validate with the library's own checks (same messages)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from ..core.checks import check_int, check_number

__all__ = [
    "MAX_SIDE",
    "PROG",
    "Parser",
    "argument_type",
    "guidance",
    "multiple_of_8",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "positive_unit_float",
    "print_error",
    "seed",
    "strength",
    "unit_float",
]

PROG = "tcd-sampler"


def _one_line(text: str) -> str:
    """``text`` on one line: its lines stripped and joined by spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def print_error(message: str) -> None:
    """Print ``tcd-sampler: error: <message>`` on stderr, ``message`` on one line (``unknown error`` if empty)."""
    print(f"{PROG}: error: {_one_line(message) or 'unknown error'}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``tcd-sampler: error: <message> (see `<prog> --help`)``, with
    exit code 2 (argparse's code; its usage block is left out)."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(2)


# ------------------------------------------------------------------------------------------------ argument types


def argument_type(parse: Callable[[str], Any], check: Callable[..., Any], *bounds: Any, **kw: Any) -> Any:
    """An argparse ``type`` that parses with ``parse``, then validates with the library's check ``check`` called as
    ``check("value", value, *bounds, **kw)`` (same messages, less the parameter name, since argparse names the
    option)."""
    kind = "an integer" if parse is int else "a number"

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return check("value", value, *bounds, **kw)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("value ")) from None

    return convert


#: ``type`` converters for the options (each raises ``ArgumentTypeError`` with the library check's message).
positive_int = argument_type(int, check_int, 1)
non_negative_int = argument_type(int, check_int, 0)
seed = argument_type(int, check_int, 0, 2**63 - 1)
strength = argument_type(float, check_number, 0.0, 1.0, low_open=True)
unit_float = argument_type(float, check_number, 0.0, 1.0)  # [0, 1]: --gamma, --caption-dropout, --ema-decay
positive_unit_float = argument_type(float, check_number, 0.0, 1.0, low_open=True)  # (0, 1]: --lr
non_negative_float = argument_type(float, check_number, 0.0, math.inf)


def guidance(text: str) -> float:
    """A classifier-free guidance scale: a finite number ≥ 0 (``non_negative_float`` refuses ``inf`` and ``nan``)."""
    value: float = non_negative_float(text)
    return value


#: The largest --width/--height accepted (16384 px: far beyond what the supported models generate).
MAX_SIDE = 16384


def multiple_of_8(text: str) -> int:
    """An image side: a positive multiple of 8 up to :data:`MAX_SIDE`."""
    value: int = positive_int(text)
    if value % 8 or value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 up to {MAX_SIDE}, got {text}")
    return value
