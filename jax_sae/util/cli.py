"""What the command lines share (standard library only: the extractor and exporter use it)."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable
from typing import NoReturn


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'k'?)`` for the candidate closest to a misspelt ``word``, or ``""`` when
    none is close: appended to an "unknown ..." error, it names the fix for a typo."""
    pool = list(candidates)
    same_letters = [c for c in pool if c.lower() == word.lower()]
    close = same_letters or difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line, like every other error of
    the project (argparse prints the whole usage text first); ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
