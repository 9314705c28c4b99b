"""YAML as nstd reads it (job files, config.yaml, error.yaml, retry's overrides: one reader) and
writes it for people (error.yaml, job.yaml, retried.yaml, a retried job file).

Read: a SafeLoader that refuses anchors and aliases (a billion laughs in a few lines) and deep
nesting. Written: PyYAML quotes a string that needs quoting in single quotes and doubles every ' inside it, so
error.yaml said `stpes: unknown key (did you mean ''steps''?)`. Here such a string is written in
double quotes instead (control characters escaped, as double quotes do); it reads back the same.
"""
from __future__ import annotations

import yaml

#: What a reader catches: YAML that cannot be read, or is refused.
YAMLError = yaml.YAMLError

#: Deepest nesting read (a job file needs 3; 2 KB of brackets must not exhaust the stack).
MAX_DEPTH = 16


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    node = dumper.represent_scalar("tag:yaml.org,2002:str", value)
    if "'" in value and "\n" not in value:
        node.style = '"'
    return node


_Dumper.add_representer(str, _str)


def dump(data) -> str:
    """`data` as YAML, keys in their order, non-ASCII as itself."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (a user's file never needs them: an alias bomb
    is a few lines) and nesting deeper than MAX_DEPTH."""

    depth = 0
    aliases = False

    def compose_node(self, parent, index):  # type: ignore[override]
        event = self.peek_event()
        if not self.aliases and (self.check_event(yaml.AliasEvent) or getattr(event, "anchor", None)):
            raise yaml.YAMLError(f"anchors and aliases are not allowed (line {event.start_mark.line + 1})")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _AdminLoader(_StrictLoader):
    """The operator's own config.yaml: anchors and aliases allowed (sections that share settings)."""

    aliases = True


def load(text: str, aliases: bool = False):
    """`text`'s YAML, read strictly (above); `aliases`: the operator's config.yaml, where anchors
    and aliases are the admin's own (users' files never get them). Raises yaml.YAMLError
    (RecursionError too, as one)."""
    try:
        return yaml.load(text, Loader=_AdminLoader if aliases else _StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # belt and braces: the depth limit should have stopped it
        raise yaml.YAMLError("nested too deeply") from None
