"""A progress bar on stderr for the slow phases, or nothing."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A tqdm bar when wanted; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, desc: str, total: float, unit: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def update(self, n: float, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
