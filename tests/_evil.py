"""A pickled object that would act when loaded: what safe loading must refuse without running it."""

from __future__ import annotations


class Evil:
    """Unpickling this object would create (truncate) the file at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))
