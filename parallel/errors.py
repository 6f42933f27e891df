"""The error type for a bad parallel layout."""


class LayoutError(ValueError):
    """A parallel layout that cannot run: names the config key and says how to fix it."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key = key
        super().__init__(f"config error at `{key}`: {problem} Fix: {fix}")
