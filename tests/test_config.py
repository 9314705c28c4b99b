from pathlib import Path

import pytest
import yaml

from nstd.config import CONFIG_FIELDS, ConfigError, load_config
from nstd.schema import defaults

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_matches_builtin_defaults():
    shipped = load_config(REPO / "config.yaml")
    builtin = defaults(CONFIG_FIELDS)
    for section, values in builtin.items():
        if section == "paths":
            continue
        assert shipped[section] == values, section
    assert shipped["paths"]["inbox"] == str(REPO / "var" / "inbox")


def test_every_key_is_documented_in_config_yaml():
    text = (REPO / "config.yaml").read_text()
    data = yaml.safe_load(text)
    for section, spec in CONFIG_FIELDS.items():
        assert set(data[section]) == set(spec), section


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, message",
    [
        ("engine:\n  wieghts: torchvision\n", "engine.wieghts: unknown key"),
        ("gpu:\n  vram_budget_mb: lots\n", "gpu.vram_budget_mb: expected an integer"),
        ("watch:\n  polling: yes please\n", "watch.polling: expected true or false"),
        ("defaults:\n  size: 10\n", "defaults.size: expected an integer from 32 to 8192, got 10"),
        ("defaults:\n  style_layers: [conv9_9]\n", r"defaults.style_layers\[0\]: expected one of conv1_1"),
        ("defaults:\n  gif: 3\n", "defaults.gif: expected false or a mapping"),
        ("engine: cpu\n", "engine: expected a mapping"),
        ("- a\n- b\n", "expected a mapping"),
        ("engine: [unclosed\n", "not valid YAML"),
        ("bogus: 1\n", "bogus: unknown key"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    cfg = load_config(_write(tmp_path, "paths:\n  root: data\n  inbox: /srv/share/in\n"))
    assert cfg["paths"]["root"] == str(tmp_path / "data")
    assert cfg["paths"]["outbox"] == str(tmp_path / "data" / "outbox")
    assert cfg["paths"]["inbox"] == "/srv/share/in"


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, ""))
    assert cfg["defaults"]["steps"] == 300 and cfg["engine"]["weights"] == "vgg19-caffe"


def test_yaml11_exponent_strings_are_numbers(tmp_path):
    cfg = load_config(_write(tmp_path, "defaults:\n  style_weight: 1e5\n  tv_weight: 2.5E-1\n"))
    assert cfg["defaults"]["style_weight"] == 1e5 and cfg["defaults"]["tv_weight"] == 0.25
    with pytest.raises(ConfigError, match="style_weight: expected a number"):
        load_config(_write(tmp_path, "defaults:\n  style_weight: 1e4x\n"))


def test_machine_memory_is_the_lowest_cgroup_limit_above_this_process(tmp_path):
    from nstd.config import machine_memory_bytes

    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/system.slice/nstd.service\n")
    unit = tmp_path / "sys/fs/cgroup/system.slice/nstd.service"
    unit.mkdir(parents=True)
    (unit / "memory.max").write_text("max\n")
    (unit / "memory.high").write_text(f"{6 * 2**30}\n")
    (unit.parent / "memory.max").write_text(f"{8 * 2**30}\n")
    assert machine_memory_bytes(tmp_path) == 6 * 2**30  # lower than the machine's, if it has 6 GiB or more
    (unit / "memory.high").write_text("max\n")
    assert machine_memory_bytes(tmp_path) == min(8 * 2**30, machine_memory_bytes(tmp_path / "none") or 2**62)
    (tmp_path / "proc/self/cgroup").write_text("4:memory:/docker/abc\n")  # cgroup v1
    v1 = tmp_path / "sys/fs/cgroup/memory/docker/abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    assert machine_memory_bytes(tmp_path) == 2 * 2**30


def test_config_refuses_a_list_of_stages_as_a_default_and_a_tiny_cpu_budget(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("defaults:\n  stages: [{size: 256, steps: 10}]\n")
    with pytest.raises(ConfigError, match="defaults.stages: a list of stages fixes every job's size"):
        load_config(p)
    p.write_text("limits:\n  cpu_memory_mb: 10\n")
    with pytest.raises(ConfigError, match="limits.cpu_memory_mb: expected 0"):
        load_config(p)


def test_a_reload_hands_out_a_new_config_and_keeps_what_needs_a_restart():
    """SIGHUP: a new dict, the running one untouched (a part reading it mid-job sees one whole
    config); settings that only a restart applies keep their running value and are named."""
    import copy

    from nstd.config import reloaded

    running = load_config(None)
    before = copy.deepcopy(running)
    new = load_config(None)
    new["defaults"]["steps"] = 42
    new["queue"]["max_attempts"] = 7
    new["queue"]["backend"] = "celery"  # a restart's
    new["watch"]["settle_seconds"] = 9.0
    new["watch"]["polling"] = True  # a restart's
    new["paths"]["root"] = "/elsewhere"  # a restart's
    cfg, restart = reloaded(running, new)
    assert running == before and cfg is not running
    assert cfg["defaults"]["steps"] == 42 and cfg["queue"]["max_attempts"] == 7 and cfg["watch"]["settle_seconds"] == 9.0
    assert cfg["queue"]["backend"] == "local" and cfg["watch"]["polling"] is False and cfg["paths"] == running["paths"]
    assert set(restart) == {"paths", "queue.backend", "watch.polling"}


def test_the_operators_config_may_use_anchors_a_job_file_may_not(tmp_path):
    """One YAML reader: config.yaml (the admin's) may share settings with an anchor; nesting stays
    bounded there too. A job file's anchors are refused (tests/test_jobfile.py)."""
    path = tmp_path / "config.yaml"
    path.write_text("defaults: &d\n  steps: 123\nlimits:\n  max_steps: 5000\n")
    assert load_config(path)["defaults"]["steps"] == 123
    path.write_text("x: " + "[" * 40 + "]" * 40 + "\n")
    with pytest.raises(ConfigError, match="nested deeper"):
        load_config(path)
