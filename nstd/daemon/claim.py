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

from nstd.fsutil import atomic_write_text

CLAIM_FILE = "claim.json"


@dataclass
class Input:
    file: str  # name inside the job's inputs/ folder
    origin: str  # path as dropped, relative to the inbox


@dataclass
class StyleInput(Input):
    weight: float = 1.0


@dataclass
class Times:
    """Wall-clock seconds since the epoch."""

    first_seen: float  # the job file first seen in the inbox
    arrived: float  # the job file's ctime: "oldest first" means this
    claimed: float
    started: list[float] = field(default_factory=list)  # one per attempt


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
            styles=[StyleInput(**s) for s in r["styles"]], sidecar=Input(**r["sidecar"]),
            settings=r["settings"], times=Times(**r["times"]),
            init=Input(**r["init"]) if r.get("init") else None, attempts=int(r.get("attempts", 0)), folder=folder,
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
