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
