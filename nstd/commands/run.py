"""`nstd run` and `nstd worker`: the daemon on this machine, or one cluster worker."""
from __future__ import annotations

import argparse
from pathlib import Path

from nstd.commands.base import UsageError, as_bad_input, config_of
from nstd.schema import SchemaError


def main(args: argparse.Namespace) -> int:
    """The daemon on this root, with the backend and the status page its config asks for."""
    from nstd.config import find_config, load_config
    from nstd.daemon.daemon import run_daemon

    path = find_config(args.config, required=True)
    cfg = load_config(path)
    return run_daemon(cfg, backend_for(cfg), page_for(cfg), lambda: load_config(path), until_empty=args.until_empty)


def backend_for(cfg: dict):
    """queue.backend: local (this machine's devices; refused on a root a cluster works) or celery."""
    if cfg["queue"]["backend"] == "celery":
        from nstd.distributed.backend import ClusterBackend

        return ClusterBackend(cfg)
    from nstd.daemon.backend import LocalBackend
    from nstd.distributed.backend import refuse_a_live_cluster

    return LocalBackend(cfg, root_check=lambda folders: refuse_a_live_cluster(cfg, folders))


def page_for(cfg: dict):
    """The status page (web.enabled), started by the daemon in a process of its own; or None."""
    if not cfg["web"]["enabled"]:
        return None
    from nstd.state.folders import Folders
    from nstd.web.launch import StatusPage

    return StatusPage(cfg["web"], Folders.from_config(cfg), Path(cfg["paths"]["root"]))


def worker(args: argparse.Namespace) -> int:
    cfg = config_of(args, required=True)
    if cfg["queue"]["backend"] != "celery":
        raise UsageError("queue.backend is local: `nstd run` runs the jobs on this machine itself; set "
                         "queue.backend: celery and queue.broker for workers on other machines (docs/distributed.md)")
    if args.device is not None:
        from nstd.config import _device

        with as_bad_input(SchemaError):
            _device(args.device, "--device")
    if args.name is not None and not (0 < len(args.name) <= 64 and all(c.isalnum() or c in "-_." for c in args.name)):
        raise UsageError(f"--name: letters, digits, '-', '_' and '.' only (at most 64), got {args.name!r}")
    try:
        from nstd.distributed.node import serve
    except ImportError as exc:
        raise UsageError(f"the distributed extra is not installed ({exc}): pip install 'nstd[distributed]'") from None
    return serve(cfg, args.device, args.name, cfg["logging"]["level"])


