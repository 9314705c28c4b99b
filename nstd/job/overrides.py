"""`nstd retry NAME key=value ...`: the overrides' grammar (a dotted key, a YAML scalar, nothing
to take a key out), laid over a job file's mapping, and as retried.yaml records them."""
from __future__ import annotations

from nstd import yamltext
from nstd.errors import NstdError


class BadOverride(NstdError):
    """An override that is not key=value (exit 2)."""


#: An override with nothing after `=` (`stpes=`) takes the key out of the job file.
REMOVE = object()


def parse(pairs: list[str]) -> dict:
    """`steps=100 gif.every=2 stpes=` -> {"steps": 100, "gif": {"every": 2}, "stpes": REMOVE}; values
    read as YAML scalars; an empty value removes the key."""
    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise BadOverride(f"{pair!r}: expected key=value, e.g. steps=500")
        try:
            value = yamltext.load(text) if text else REMOVE
        except yamltext.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BadOverride(f"{pair!r}: {part} is given both as a value and as a section")
        node[leaf] = value
    return out


def shown(overrides: dict) -> dict:
    """The overrides as retried.yaml records them (a removed key as "(removed)")."""
    return {k: shown(v) if isinstance(v, dict) else "(removed)" if v is REMOVE else v for k, v in overrides.items()}


def apply(data: dict, overrides: dict) -> dict:
    out = dict(data)
    for k, v in overrides.items():
        if v is REMOVE:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = apply(out[k], v)
        else:
            out[k] = v
    return out
