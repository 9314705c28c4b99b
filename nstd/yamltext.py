"""YAML as nstd writes it for people (error.yaml, job.yaml, retried.yaml, a retried job file).

PyYAML quotes a string that needs quoting in single quotes and doubles every ' inside it, so
error.yaml said `stpes: unknown key (did you mean ''steps''?)`. Here such a string is written in
double quotes instead (control characters escaped, as double quotes do); it reads back the same.
"""
from __future__ import annotations

import yaml


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
