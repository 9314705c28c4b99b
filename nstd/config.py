"""config.yaml: the daemon's and the CLI's settings, validated at start.

An unknown key or a wrong type stops start-up with a message naming the key. Relative paths are
taken relative to the config file's folder, so `make run` works from a checkout. Every command
finds its config the same way (`find_config`), so `nstd validate` judges a job as the daemon does.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from nstd import yamltext
from nstd.engine.options import DEFAULT_MAX_PIXELS, WEIGHT_SOURCES
from nstd.errors import NstdError
from nstd.job.check import over_limits
from nstd.job.keys import JOB_FIELDS
from nstd.job.spec import Job
from nstd.schema import (Field, SchemaError, boolean, choice, integer, list_of, number, optional, string, validate,
                         yaml_problem)


def _command(v: Any, key: str) -> str:
    """A hook's command line: split like a shell's (without running one), so it must split."""
    s = string(v, key)
    try:
        if shlex.split(s):
            return s
    except ValueError as exc:
        raise SchemaError(key, f"cannot be split into a command line ({exc}): {s!r}") from None
    raise SchemaError(key, "an empty command")


def _listen(v: Any, key: str) -> str:
    s = string(v, key)
    host, sep, port = s.rpartition(":")
    if sep and port.isdigit() and int(port) <= 65535:
        return s
    raise SchemaError(key, f"expected HOST:PORT such as 127.0.0.1:8750, got {s!r}")


def _broker(v: Any, key: str) -> str:
    s = string(v, key)
    if s.startswith(("redis://", "rediss://", "unix://")):
        return s
    raise SchemaError(key, f"expected a Redis URL such as redis://localhost:6379/0, got {s!r}")


def _queue_name(v: Any, key: str) -> str:
    s = string(v, key)
    if s and len(s) <= 64 and all(c.isalnum() or c in "-_." for c in s):
        return s
    raise SchemaError(key, f"letters, digits, '-', '_' and '.' only (at most 64), got {s!r}")


def _free_mb(v: Any, key: str) -> int | str:
    if v == "auto":
        return v
    try:
        return integer(0, 2**40)(v, key)
    except SchemaError:
        raise SchemaError(key, f"expected auto or a number of MiB (0: no check), got {v!r}") from None


def _device(v: Any, key: str) -> str:
    s = string(v, key)
    if s in ("auto", "cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise SchemaError(key, f"expected auto, cpu, cuda or cuda:N, got {s!r}")


CONFIG_FIELDS: dict[str, Any] = {
    "paths": {
        "root": Field("./var", "everything lives under here", string),
        "inbox": Field(None, "dropped jobs (default: <root>/inbox)", optional(string)),
        "outbox": Field(None, "finished jobs (default: <root>/outbox)", optional(string)),
        "quarantine": Field(None, "failed jobs (default: <root>/quarantine)", optional(string)),
        "state": Field(None, "claimed jobs, status, caches (default: <root>/state)", optional(string)),
        "logs": Field(None, "the daemon's rotated log (default: <root>/logs)", optional(string)),
    },
    "watch": {
        "polling": Field(False, "poll instead of inotify (network shares)", boolean),
        "poll_interval_seconds": Field(2.0, "polling observer's interval", number(0.1, 3600)),
        "settle_seconds": Field(2.0, "inputs unchanged this long before a job is taken", number(0, 3600)),
        "missing_timeout": Field(900.0, "seconds to wait for a sidecar's inputs", number(1, 7 * 86400)),
        "rescan_seconds": Field(60.0, "full inbox scan interval (events are hints)", number(1, 86400)),
    },
    "queue": {
        "max_attempts": Field(2, "crashes a job may cause before it is quarantined", integer(1, 100)),
        "backend": Field("local", "local (one machine) | celery (nstd worker on each GPU machine)",
                         choice("local", "celery")),
        "broker": Field(None, "with backend celery: the Redis URL, e.g. redis://intake-host:6379/0", optional(_broker)),
        "name": Field("nstd", "the broker's queue: one per cluster sharing a root", _queue_name),
        "lease_seconds": Field(60.0, "a worker silent this long is taken for dead; its job runs elsewhere",
                               number(2, 86400)),
        "visibility_seconds": Field(600.0, "the broker redelivers a message a dead worker took after this",
                                    number(1, 7 * 86400)),
    },
    "gpu": {
        "devices": Field([], "one worker per device, e.g. [cuda:0, cuda:1]; [] = engine.device", list_of(_device)),
        "vram_budget_mb": Field(4096, "peak memory a job may use on a GPU, MiB", integer(64, 1_048_576)),
        "cpu_fallback": Field(True, "after out-of-memory at the smallest size, run on the CPU", boolean),
    },
    "engine": {
        "weights": Field("vgg19-caffe", " | ".join(WEIGHT_SOURCES), choice(*WEIGHT_SOURCES)),
        "weights_file": Field(None, "local weights file (torchvision: a state dict)", optional(string)),
        "device": Field("auto", "auto | cpu | cuda | cuda:N", _device),
        "precision": Field("auto", "auto | fp32 | bf16", choice("auto", "fp32", "bf16")),
        "lbfgs_history": Field(20, "L-BFGS history length (memory: 2 x this x image size)", integer(1, 1000)),
        "cuda_graphs": Field(True, "on CUDA, replay each L-BFGS step as one captured graph", boolean),
    },
    "limits": {
        "max_pixels": Field(DEFAULT_MAX_PIXELS, "largest input image, in pixels", integer(1, 2**40)),
        "max_sidecar_bytes": Field(65536, "largest job file", integer(64, 16 * 2**20)),
        "max_input_bytes": Field(512 * 2**20, "largest input file, bytes", integer(1024, 2**40)),
        "cpu_memory_mb": Field(0, "peak memory a job may use on the CPU, MiB (memory techniques first, then a "
                               "smaller picture); 0 = half of this machine's memory", integer(0, 1_048_576)),
        # A job's own bounds (docs/jobs.md): the static ones are refused when the job is checked.
        "max_job_pixels": Field(8192 * 8192, "largest result a job may ask for, width x height",
                                integer(1024, 2**40)),
        "max_steps": Field(5000, "most optimisation steps a job may ask for, all its stages together",
                           integer(1, 10_000_000)),
        "max_stages": Field(8, "most coarse-to-fine stages a job may ask for", integer(1, 12)),
        "max_styles": Field(8, "most style images a job may blend", integer(1, 1000)),
        "min_priority": Field(-100, "lowest priority a job may ask for", integer(-1_000_000, 1_000_000)),
        "max_priority": Field(100, "highest priority a job may ask for", integer(-1_000_000, 1_000_000)),
        "max_job_seconds": Field(21600.0, "a job running longer than this is stopped and quarantined as over "
                                 "limit, its checkpoint kept for a retry; 0 = no limit", number(0, 10**8)),
        "min_free_mb": Field("auto", "room a job needs on the outbox's and state's disks before it starts (else "
                             "it waits): auto = its own result, GIF and checkpoints + 64 MiB; MiB; 0 = no check",
                             _free_mb),
    },
    "service": {
        "shutdown_grace_seconds": Field(60.0, "on SIGTERM, time the running job gets to finish", number(0, 86400)),
        "checkpoint_seconds": Field(60.0, "save a resumable checkpoint of a running job this often; 0 = never",
                                    number(0, 86400)),
        "checkpoint_every": Field(0, "also every N steps; 0 = by time only", integer(0, 100_000)),
    },
    "hooks": {
        "on_done": Field(None, "command run after a job is delivered (job in its environment)", optional(_command)),
        "on_failed": Field(None, "command run after a job is quarantined", optional(_command)),
        "timeout_seconds": Field(60.0, "a hook still running after this is killed", number(1, 86400)),
    },
    "outbox": {
        "keep_days": Field(0.0, "results older than this many days leave the outbox (their inputs/ with them), "
                           "looked at hourly; 0 = kept for ever", number(0, 100_000)),
    },
    "web": {
        "enabled": Field(True, "serve the read-only status page", boolean),
        "listen": Field("127.0.0.1:8750", "HOST:PORT of the status page (0.0.0.0:8750: every interface)", _listen),
        "results": Field(12, "last results and quarantined jobs shown", integer(1, 1000)),
        "refresh_seconds": Field(3, "the page reloads itself this often", integer(1, 3600)),
        "hosts": Field([], "names the page answers to besides its address, localhost and this machine's own "
                       "(any other Host: 421, against DNS rebinding)", list_of(string)),
        "token": Field(None, "a secret every request must carry (HTTP basic auth with it as the password, or "
                       "Authorization: Bearer); set one for a page bound beyond the loopback", optional(string)),
    },
    "logging": {
        "level": Field("INFO", "DEBUG | INFO | WARNING | ERROR", choice("DEBUG", "INFO", "WARNING", "ERROR")),
        "json": Field(False, "JSON lines instead of text", boolean),
        "rotation": Field("10 MB", "rotate logs/nstd.log at this size", string),
        "retention": Field(10, "rotated files kept", integer(1, 10_000)),
    },
    "defaults": JOB_FIELDS,
}


class ConfigError(NstdError, ValueError):
    """config.yaml cannot be used; the message names the file and the key."""


#: Where a command looks for its config when --config is not given, in this order.
ENV_VAR = "NSTD_CONFIG"
LOCAL_CONFIG = Path("config.yaml")
SYSTEM_CONFIG = Path("/etc/nstd/config.yaml")


def find_config(explicit: str | None, required: bool) -> Path | None:
    """The config a command uses: --config, else $NSTD_CONFIG, else ./config.yaml, else
    /etc/nstd/config.yaml. None (the built-in defaults) when there is none and it is not
    `required`; commands that need the daemon's folders require one."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    for candidate in (LOCAL_CONFIG, SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    if required:
        raise ConfigError(f"no config file: none given with --config or ${ENV_VAR}, and neither ./{LOCAL_CONFIG} "
                          f"nor {SYSTEM_CONFIG} exists; pass --config FILE (the daemon's config.yaml)")
    return None


def load_config(path: Path | str | None = None) -> dict:
    """Read and validate a config file; None gives the built-in defaults (= the shipped config.yaml)."""
    if path is None:
        cfg = validate({}, CONFIG_FIELDS)
        base = Path.cwd()
    else:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            hint = "" if path.is_absolute() else f" (looked in {Path.cwd()}; pass --config with the full path)"
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc}){hint}") from None
        try:
            data = yamltext.load(text, aliases=True)
        except yamltext.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        try:
            cfg = validate(data, CONFIG_FIELDS)
        except SchemaError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if cfg["queue"]["backend"] == "celery" and not cfg["queue"]["broker"]:
            raise ConfigError(f"{path}: queue.broker: queue.backend celery needs the broker's URL "
                              "(redis://HOST:6379/0)")
        if isinstance(cfg["defaults"]["stages"], list):
            raise ConfigError(f"{path}: defaults.stages: a list of stages fixes every job's size; as a default "
                              "use auto or a number of stages, and put lists in job files")
        if cfg["limits"]["min_priority"] > cfg["limits"]["max_priority"]:
            raise ConfigError(f"{path}: limits.min_priority ({cfg['limits']['min_priority']}) is above "
                              f"limits.max_priority ({cfg['limits']['max_priority']})")
        over = over_limits(Job.of(cfg["defaults"]), cfg["limits"])  # the defaults are a job the limits must allow
        if over:
            raise ConfigError(f"{path}: defaults: every job would be refused: {'; '.join(over)}")
        if 0 < cfg["limits"]["cpu_memory_mb"] < 64:
            raise ConfigError(f"{path}: limits.cpu_memory_mb: expected 0 (half the memory) or at least 64, "
                              f"got {cfg['limits']['cpu_memory_mb']}")
        base = path.resolve().parent
    _resolve_paths(cfg, base)
    return cfg


def _resolve_paths(cfg: dict, base: Path) -> None:
    paths = cfg["paths"]
    root = (base / paths["root"]).resolve()
    paths["root"] = str(root)
    for name in ("inbox", "outbox", "quarantine", "state", "logs"):
        paths[name] = str((base / paths[name]).resolve()) if paths[name] else str(root / name)
    if cfg["engine"]["weights_file"]:
        cfg["engine"]["weights_file"] = str((base / cfg["engine"]["weights_file"]).resolve())


def machine_memory_bytes(root: Path = Path("/")) -> int | None:
    """This machine's memory, or the lowest memory limit of this process's cgroup and the
    cgroups above it when lower (a container; systemd's MemoryMax= or MemoryHigh=); None where
    nothing can be read. (`root`: where /proc and /sys are; tests give a fake tree.)"""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError):
        pass
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, where = (line.split(":", 2) + ["", ""])[:3]
        v2 = hierarchy == "0" and controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        base = root / "sys/fs/cgroup" if v2 else root / "sys/fs/cgroup/memory"
        names = ("memory.max", "memory.high") if v2 else ("memory.limit_in_bytes",)
        folder = base / where.strip("/")
        while True:  # this cgroup and every one above it, up to the mount's root
            for name in names:
                try:
                    text = (folder / name).read_text().strip()
                except OSError:
                    continue
                if text.isdigit() and int(text) < 2**60:
                    limits.append(int(text))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def memory_budget(cfg: dict, cuda: bool) -> tuple[int, str]:
    """(bytes a job may peak at, the setting that says so): on a GPU `gpu.vram_budget_mb`; on the
    CPU `limits.cpu_memory_mb`, 0 meaning half this machine's memory (a 2 KB job file asking for
    8192 px must not get the process killed for memory, nor the machine swapping)."""
    if cuda:
        mb = cfg["gpu"]["vram_budget_mb"]
        return mb * 2**20, f"gpu.vram_budget_mb={mb}"
    mb = cfg["limits"]["cpu_memory_mb"]
    if mb:
        return mb * 2**20, f"limits.cpu_memory_mb={mb}"
    half = (machine_memory_bytes() or 8 * 2**30) // 2
    return half, f"limits.cpu_memory_mb=0 (half this machine's memory, {half >> 20} MiB)"


# ------------------------------------------------------------------ reload

#: Settings that only a restart applies (SIGHUP names them in a warning).
RESTART_KEYS = ("paths", "engine", "gpu.devices", "watch.polling", "watch.poll_interval_seconds", "web",
                "queue.backend", "queue.broker", "queue.name")


#: The RESTART_KEYS inside the sections a reload otherwise replaces whole.
RESTART_KEYS_IN = {"queue": ("backend", "broker", "name")}


def reloaded(running: dict, new: dict) -> tuple[dict, list[str]]:
    """The configuration after a reload (SIGHUP): `new`, except what only a restart applies
    (RESTART_KEYS), kept as it runs, and those keys that differ. A new dict: the running one is
    never changed (the daemon hands the new one to each of its parts)."""
    cfg = {**running}
    for section in ("defaults", "limits", "queue", "service", "logging", "hooks", "outbox"):
        kept = {k: running[section][k] for k in RESTART_KEYS_IN.get(section, ())}
        cfg[section] = {**new[section], **kept}
    cfg["watch"] = {**running["watch"], **{k: new["watch"][k] for k in ("settle_seconds", "missing_timeout", "rescan_seconds")}}
    cfg["gpu"] = {**running["gpu"], **{k: new["gpu"][k] for k in ("vram_budget_mb", "cpu_fallback")}}
    return cfg, [key for key in RESTART_KEYS if _get(running, key) != _get(new, key)]


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg
