"""What the command lines share (standard library only: the extractor and exporter use it)."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line, like every other error of
    the project (argparse prints the whole usage text first); ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
