"""What the command-line tools share: bad arguments are one error line, not the whole usage."""
from __future__ import annotations

import argparse
import typing


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line pointing at ``--help``, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
