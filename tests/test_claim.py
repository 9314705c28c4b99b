"""The claim record: its JSON round trip, an older nstd's record after an upgrade, and a claimed
input that changed after intake checked it."""
import json

import torch
import yaml
from PIL import Image

from nstd.state.claim import Claim
from nstd.daemon.worker import is_oom
from test_worker import claim, make_worker


def test_json_round_trip(tmp_path, monkeypatch):
    w, store = make_worker(tmp_path, monkeypatch, "cpu", oom_above=None)
    job = claim(store, w.cfg["defaults"])
    again = Claim.from_folder(job.folder)
    assert again == job and again.folder == job.folder
    assert again.content.origin == "c.png" and again.styles[0].weight == 1.0 and again.sidecar.file == "j.yaml"


def test_a_record_of_an_older_nstd_resumes_after_an_upgrade(tmp_path, monkeypatch):
    w, store = make_worker(tmp_path, monkeypatch, "cpu", oom_above=None)
    folder = store.jobs / "20261125-010203-abcdef12"
    (folder / "inputs").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(folder / "inputs" / "a.png")
    Image.new("RGB", (20, 20)).save(folder / "inputs" / "b.png")
    (folder / "inputs" / "old.yaml").write_text("content: a.png\nstyle: [b.png, {path: b.png, weight: 3}]\n")
    settings = {**w.cfg["defaults"], "size": 40, "gif": False}
    (folder / "claim.json").write_text(json.dumps({
        "settings": settings, "priority": 0, "style_weights": [1.0, 3.0], "first_seen": 1.0, "arrived": 2.0,
        "origins_by_role": {"content": "a.png", "style0": "sub/b.png", "style1": "sub/b.png", "sidecar": "old.yaml"},
        "id": folder.name, "name": "old", "files": {"content": "a.png", "style0": "b.png", "style1": "b.png",
                                                    "sidecar": "old.yaml"},
        "attempts": 1, "claimed_at": 3.0, "origins": {}, "started_at": [4.0],
    }))
    [job] = store.recover()
    assert job.attempts == 1 and [s.weight for s in job.styles] == [1.0, 3.0] and job.times.arrived == 2.0
    w.process(job)
    report = json.loads((store.outbox / "old" / "report.json").read_text())
    effective = yaml.safe_load((store.outbox / "old" / "job.yaml").read_text())
    assert report["attempts"] == 2 and effective["content"] == "a.png"
    assert effective["style"] == [{"path": "sub/b.png", "weight": 1.0}, {"path": "sub/b.png", "weight": 3.0}]


def test_an_input_changed_after_intake_is_its_own_error(tmp_path, monkeypatch):
    w, store = make_worker(tmp_path, monkeypatch, "cpu", oom_above=None)
    job = claim(store, w.cfg["defaults"])
    job.path(job.content).write_bytes(b"no longer a picture")
    w.process(job)
    err = yaml.safe_load((store.f.quarantine / "j" / "error.yaml").read_text())
    assert err["kind"] == "input changed" and err["stage"] == "run" and "readable when the job was taken" in err["message"]


def test_what_counts_as_out_of_memory():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory")) and is_oom(MemoryError())
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert is_oom(RuntimeError("cuDNN error: unable to find an engine to execute this computation"))
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom(ValueError("out of memory"))
