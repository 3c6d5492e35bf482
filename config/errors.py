"""The one error type of configuration: where, what was expected, what was found."""

from __future__ import annotations


class ConfigError(Exception):
    """A setting that stops start-up.

    The message names the file, the dotted key, what was expected and what was
    found, e.g. ``plugins.toml: plugins.openai.upstreams[0].read_timeout: expected
    a number, found 'soon' (a string)``.
    """

    def __init__(self, source: str, key: str, expected: str, found: str) -> None:
        self.source = source
        self.key = key
        self.expected = expected
        self.found = found
        super().__init__(f"{source}: {key}: expected {expected}, found {found}")
