"""A claimed job: its state folder and its record, which it owns and saves (as rq's Job does).

The record is `state/jobs/<id>/claim.json`; `Claim.from_folder()` reads it back after a restart.
Inputs are named by the file they became inside `inputs/` and by where they were dropped
(`origin`, relative to the inbox), so a report or a retry can say what the user gave.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nstd.errors import ExitCode, NstdError
from nstd.fsutil import atomic_write_text

CLAIM_FILE = "claim.json"


@dataclass
class Input:
    file: str  # name inside the job's inputs/ folder
    origin: str  # path as dropped, relative to the inbox


@dataclass
class StyleInput(Input):
    weight: float = 1.0
    #: where in the picture this style goes (job key `style[i].mask`); None: everywhere
    mask: Input | None = None

    @classmethod
    def of(cls, record: dict) -> "StyleInput":
        """From claim.json (one written before masks has none)."""
        mask = record.get("mask")
        return cls(**{**record, "mask": Input(**mask) if mask else None})


@dataclass
class Times:
    """Wall-clock seconds since the epoch."""

    first_seen: float  # the job file first seen in the inbox
    arrived: float  # the job file's ctime: "oldest first" means this
    claimed: float
    started: list[float] = field(default_factory=list)  # one per attempt


@dataclass
class JobFiles:
    """The files a job file names, as paths inside the inbox: what a claim moves into state."""

    sidecar: Path
    content: Path
    styles: list[tuple[Path, float]]
    init: Path | None = None
    #: each style's mask (`style[i].mask`), parallel to `styles`; empty: no style has one
    masks: list[Path | None] = field(default_factory=list)
    #: the `keep` mask: regions that stay the content
    keep: Path | None = None
    #: files not there yet (the job waits for them); empty when usable
    missing: list[Path] = field(default_factory=list)
    #: the blend weights as written add up to this (`styles` holds them normalised)
    weight_sum: float = 1.0

    def mask(self, i: int) -> Path | None:
        """Style `i`'s mask, or None."""
        return self.masks[i] if i < len(self.masks) else None

    def mask_keys(self) -> list[tuple[str, Path]]:
        """(job key, file) of every mask: `style[i].mask` and `keep`."""
        out = [(f"style[{i}].mask", m) for i, m in enumerate(self.masks) if m is not None]
        return out + ([("keep", self.keep)] if self.keep is not None else [])

    def inputs(self) -> list[Path]:
        """Every file of the job, sidecar last (it is the commit marker), without duplicates."""
        files = [self.content, *(p for p, _ in self.styles), *(m for _, m in self.mask_keys())]
        if self.init is not None:
            files.append(self.init)
        return list(dict.fromkeys(files)) + [self.sidecar]


@dataclass
class Claim:
    id: str
    name: str
    content: Input
    styles: list[StyleInput]
    sidecar: Input
    settings: dict
    times: Times
    init: Input | None = None
    #: the `keep` mask (regions that stay the content)
    keep: Input | None = None
    attempts: int = 0
    #: the state folder; not part of the record
    folder: Path = field(default=Path("."), compare=False)

    @property
    def priority(self) -> int:
        return int(self.settings.get("priority", 0))

    @property
    def inputs_dir(self) -> Path:
        return self.folder / "inputs"

    @property
    def log_path(self) -> Path:
        """The job's own log, copied into the outbox or quarantine with it."""
        return self.folder / "job.log"

    def path(self, inp: Input) -> Path:
        return self.inputs_dir / inp.file

    def records(self) -> list[Input]:
        """Every input's record: content, styles, their masks, keep, init and the sidecar."""
        found = [self.content, *self.styles, *(s.mask for s in self.styles), self.keep, self.init, self.sidecar]
        return [i for i in found if i is not None]

    def sort_key(self) -> tuple:
        """Highest priority first, then the job file that arrived first."""
        return (-self.priority, self.times.arrived, self.times.claimed)

    def begin_attempt(self) -> None:
        """Count the attempt and save before anything can crash: a crash loop ends in quarantine."""
        self.attempts += 1
        self.times.started.append(time.time())
        self.save()

    def give_back_attempt(self) -> None:
        """An orderly stop is not a crash."""
        self.attempts -= 1
        self.save()

    # ------------------------------------------------------------------ the record

    def to_json(self) -> str:
        record = asdict(self)
        del record["folder"]
        return json.dumps(record, indent=1)

    def save(self) -> None:
        atomic_write_text(self.folder / CLAIM_FILE, self.to_json(), parents=False)  # never makes a gone folder

    @classmethod
    def from_json(cls, text: str, folder: Path) -> "Claim":
        r = json.loads(text)
        if "files" in r:
            r = _from_v1(r)
        return cls(
            id=r["id"], name=r["name"], content=Input(**r["content"]),
            styles=[StyleInput.of(s) for s in r["styles"]], sidecar=Input(**r["sidecar"]),
            settings=r["settings"], times=Times(**r["times"]), init=Input(**r["init"]) if r.get("init") else None,
            keep=Input(**r["keep"]) if r.get("keep") else None, attempts=int(r.get("attempts", 0)), folder=folder,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "Claim":
        return cls.from_json((folder / CLAIM_FILE).read_text(encoding="utf-8"), folder)


def _from_v1(r: dict) -> dict:
    """A record written before the Claim type (roles as `style0`, `style1`...): state left by an
    older nstd still resumes after an upgrade."""
    files, origin = r["files"], r.get("origins_by_role", {})
    inp = lambda role: {"file": files[role], "origin": origin.get(role, files[role])}  # noqa: E731
    claimed = r["claimed_at"]
    return {
        "id": r["id"], "name": r["name"], "content": inp("content"), "sidecar": inp("sidecar"),
        "styles": [{**inp(f"style{i}"), "weight": w} for i, w in enumerate(r["style_weights"])],
        "init": inp("init") if "init" in files else None, "settings": r["settings"], "attempts": r.get("attempts", 0),
        "times": {"first_seen": r.get("first_seen", claimed), "arrived": r.get("arrived", claimed),
                  "claimed": claimed, "started": r.get("started_at", [])},
    }


# ------------------------------------------------------------------ the claimed jobs, listed


class NoSuchJob(NstdError):
    """No claimed job has that name (exit 4)."""

    exit_code = ExitCode.NO_SUCH_JOB


@dataclass(frozen=True)
class Claimed:
    id: str
    name: str
    folder: Path


def claimed(jobs_dir: Path) -> list[Claimed]:
    """Every claimed job in state/jobs/, oldest first (read from claim.json, torch-free)."""
    out = []
    try:
        folders = sorted(d for d in jobs_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return out
    for d in folders:
        try:
            record = json.loads((d / "claim.json").read_text())
            out.append(Claimed(str(record["id"]), str(record["name"]), d))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def find(jobs_dir: Path, name: str, outbox: Path | None = None) -> Claimed:
    """The claimed job called `name` (its job file's name without .yaml) or with that id."""
    jobs = claimed(jobs_dir)
    found = [j for j in jobs if name in (j.id, j.name)]
    if not found and outbox is not None and "/" not in name and name not in ("", ".", "..") and (outbox / name).is_dir():
        raise NoSuchJob(f"{name!r} is not queued or running: it has finished (see {outbox / name})")
    if not found:
        known = ", ".join(j.name for j in jobs) or "none"
        raise NoSuchJob(f"no queued or running job is called {name!r} (claimed now: {known}); "
                        "nor waiting in the inbox")
    if len(found) > 1:
        raise NoSuchJob(f"several jobs are called {name!r}: give the id of one ({', '.join(j.id for j in found)})")
    return found[0]
