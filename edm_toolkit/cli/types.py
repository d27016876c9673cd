"""Option types of the ``edm`` commands: the one bounded path from command-line text to a number.

Every numeric option goes through these types, so the checks hold for every command: a float is finite (infinity
only where the option says so, e.g. EDM's ``--S_max inf``) and within its range, an integer within its range, a
seed list within ``MAX_SEEDS`` seeds of 0..2**32 - 1 (counted before a list is built), a list of numbers
without empty items, a boolean spelled out (not empty text), and an output name neither empty nor longer than a
file name can be. A bad value is a usage error (exit 2) that names the option, before any work.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import click

from ..registry import show

MAX_SEED = 2**32 - 1  # EDM seeds each image's generator with seed % 2**32: larger seeds only repeat these
MAX_SEEDS = 1_000_000  # seeds in one run (a list of them costs ~40 bytes each); FID needs 50,000


class Number(click.FloatRange):
    """A float in a range (click.FloatRange, whose messages and help name the range), never NaN, and +-inf only
    with ``allow_inf``."""

    def __init__(self, min: float | None = None, max: float | None = None, *, min_open: bool = False,
                 max_open: bool = False, allow_inf: bool = False):
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)
        self.allow_inf = allow_inf

    def convert(self, value, param, ctx):
        if isinstance(value, str) and len(value) > 100:  # no number needs more; keeps the message short
            self.fail(f"{show(value)} is not a number", param, ctx)
        number = super().convert(value, param, ctx)
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            self.fail(f"{show(value)} is not a finite number", param, ctx)
        return number


def Count(min: int = 0, max: int | None = None) -> click.IntRange:
    """An integer in [min, max] (click.IntRange, whose messages name the range). Without a max, any size is read
    (click refuses the text of an integer beyond Python's 4300 digits), so the option's use must bound it."""
    return click.IntRange(min=min, max=max)


def parse_seeds(value) -> list[int]:
    """EDM's seed syntax: a comma-separated list of non-negative integers and ranges, e.g. 1,2,5-10.

    Seeds lie in 0..2**32 - 1 and a list holds at most MAX_SEEDS of them; both are checked on the text, before
    any list is built, so '0-99999999999999' costs nothing.
    """
    if isinstance(value, list):
        return value
    text = str(value)
    if len(text) > 20 * MAX_SEEDS:
        raise click.BadParameter(f"the list is longer than {MAX_SEEDS:,} seeds could be")
    spans: list[tuple[int, int]] = []
    count = 0
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not match:
            raise click.BadParameter(f"{show(part)} is not a seed; use non-negative integers and ranges, e.g. 1,2,5-10")
        lo = _seed(match.group(1))
        hi = lo if match.group(2) is None else _seed(match.group(2))
        if hi < lo:
            raise click.BadParameter(f"range {part!r} is empty; write it low-high, e.g. 0-63")
        count += hi - lo + 1
        if count > MAX_SEEDS:
            raise click.BadParameter(f"more than {MAX_SEEDS:,} seeds; split the run into several")
        spans.append((lo, hi))
    return [seed for lo, hi in spans for seed in range(lo, hi + 1)]


def _seed(digits: str) -> int:
    if len(digits) > len(str(MAX_SEED)) or int(digits) > MAX_SEED:
        raise click.BadParameter(f"seed {show(digits, 24)} is out of range: seeds lie in 0..{MAX_SEED} (EDM seeds "
                                 "each image's generator with seed % 2**32)")
    return int(digits)


class ParsedList(click.ParamType):
    """A list option read by ``parse`` (which raises click.BadParameter), e.g. ParsedList(parse_seeds)."""

    name = "LIST"

    def __init__(self, parse):
        self.parse = parse

    def convert(self, value, param, ctx):
        try:
            return self.parse(value)
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


def Seeds() -> ParsedList:  # noqa: N802  (an option type, named like the others)
    """EDM's seed lists, e.g. 0-63 or 1,5,10-12 (:func:`parse_seeds`)."""
    return ParsedList(parse_seeds)


class Interval(click.ParamType):
    """LO,HI: two numbers with 0 <= LO <= HI, HI possibly inf (a noise-level interval)."""

    name = "LO,HI"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        if len(parts) != 2:
            self.fail(f"{show(value)} is not LO,HI (two numbers)", param, ctx)
        try:
            lo = Number(min=0).convert(parts[0], None, None)
            hi = Number(min=0, allow_inf=True).convert(parts[1], None, None)
        except click.BadParameter as exc:
            self.fail(f"{show(value)} is not LO,HI: {exc.message}", param, ctx)
        if not lo <= hi:
            self.fail(f"LO {lo:g} is above HI {hi:g}", param, ctx)
        return lo, hi


MAX_LIST = 1000  # items in a list of numbers (--cres, --phema, ...): none needs more

NAME_MAX = 255  # bytes of one file name (Linux, macOS and Windows file systems)


class Bool(click.types.BoolParamType):
    """A boolean, 1/0, true/false, yes/no, on/off (click's spellings); empty text is refused, not read as false."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("empty text is not a boolean; give 1 or 0", param, ctx)
        return super().convert(value, param, ctx)


class NumberList(click.ParamType):
    """A comma-separated list of at most MAX_LIST numbers, each converted by ``item`` (a Number or Count), e.g.
    --cres 1,2,2,2; integer lists also take EDM's ranges (1-3 is 1,2,3). Empty text or an empty item is refused.
    Converts to a tuple."""

    name = "LIST"

    def __init__(self, item: click.ParamType):
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        if len(parts) > MAX_LIST:
            self.fail(f"more than {MAX_LIST} items", param, ctx)
        if not all(part.strip() for part in parts):
            self.fail(f"{show(value)} has an empty item; give numbers separated by commas, e.g. 1,2,2", param, ctx)
        items = []
        for part in parts:
            span = re.fullmatch(r"([0-9]{1,9})-([0-9]{1,9})", part.strip()) if isinstance(self.item, click.IntRange) else None
            if span:  # EDM's parse_int_list: lo-hi stands for lo, lo + 1, ..., hi
                lo, hi = int(span.group(1)), int(span.group(2))
                if hi < lo or len(items) + hi - lo + 1 > MAX_LIST:
                    self.fail(f"range {show(part.strip(), 24)} is empty or makes more than {MAX_LIST} items", param,
                              ctx)
                texts = [str(v) for v in range(lo, hi + 1)]
            else:
                texts = [part.strip()]
            for text in texts:
                try:
                    items.append(self.item.convert(text, None, None))
                except click.BadParameter as exc:
                    self.fail(f"item {show(text, 24)}: {exc.message}", param, ctx)
        return tuple(items)


def check_file_name(text: str) -> str | None:
    """Why ``text`` cannot name a file or directory to write (empty, or a part longer than NAME_MAX bytes), or
    None. Undecodable bytes (surrogate escapes) are a valid name's."""
    if not text.strip():
        return "the name is empty"
    for part in Path(text).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            return f"{show(part, 24)} is longer than a file name can be ({NAME_MAX} bytes)"
    return None


class OutputDir(click.Path):
    """A directory to write into: not empty text, not an existing file, each part a possible file name."""

    def __init__(self):
        super().__init__(file_okay=False)

    def convert(self, value, param, ctx):
        problem = check_file_name(str(value))
        if problem:
            self.fail(problem.replace("the name", "the directory name"), param, ctx)
        return super().convert(value, param, ctx)


class OutputFile(click.Path):
    """A file to write: not empty text, not an existing directory, each part a possible file name."""

    def __init__(self):
        super().__init__(dir_okay=False)

    def convert(self, value, param, ctx):
        problem = check_file_name(str(value))
        if problem:
            self.fail(problem.replace("the name", "the file name"), param, ctx)
        return super().convert(value, param, ctx)
