"""Settings: the example file is complete and valid, env overrides win, bad values are named."""

import tomllib
from pathlib import Path

import pytest

from daemon.config import Settings, example_toml, load_settings
from daemon.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "headscreen.toml"
    path.write_text(text)
    return path


def test_example_is_valid_and_covers_every_key(tmp_path):
    example = example_toml()
    settings = load_settings(write(tmp_path, example))
    assert settings.ae_title == "HEADSCREEN"
    mentioned = set(tomllib.loads(example)) | {
        line.lstrip("# ").split(" ", 1)[0] for line in example.splitlines() if line.startswith("# ") and " = " in line
    }
    assert set(Settings.model_fields) <= mentioned, set(Settings.model_fields) - mentioned


def test_environment_overrides_file(tmp_path, monkeypatch):
    path = write(tmp_path, 'port = 4000\nallow_any_caller = true\n[delivery]\nmax_attempts = 3\n')
    monkeypatch.setenv("HEADSCREEN_PORT", "5000")
    monkeypatch.setenv("HEADSCREEN_DELIVERY__MAX_ATTEMPTS", "9")
    monkeypatch.setenv("HEADSCREEN_DESTINATIONS", '[{"name": "pacs", "ae_title": "PACS", "host": "10.1.1.1", "port": 104}]')
    settings = load_settings(path)
    assert settings.port == 5000
    assert settings.delivery.max_attempts == 9
    assert settings.destinations[0].ae_title == "PACS"


def test_database_defaults_to_sqlite_in_storage(tmp_path):
    settings = load_settings(write(tmp_path, f'allow_any_caller = true\nstorage_dir = "{tmp_path}"\n'))
    assert settings.database_url == f"sqlite:///{tmp_path / 'headscreen.db'}"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port = 70000\nallow_any_caller = true", "port"),
        ('ae_title = "A_TITLE_FAR_TOO_LONG"\nallow_any_caller = true', "ae_title"),
        ('allowed_callers = [{ ae_title = "PACS", host = "not-an-ip" }]', "allowed_callers.0.host"),
        ("workers = -1\nallow_any_caller = true", "workers"),
        ("allow_any_caller = true\nunknown_key = 1", "unknown_key"),
        ('allow_any_caller = true\ndestinations = [{ name = "p", ae_title = "P", host = "h", port = 0 }]', "destinations.0.port"),
        ("", "allowed_callers is empty"),
        ('allow_any_caller = true\ndatabase_url = "mysql://x"', "database_url"),
    ],
)
def test_bad_values_are_named(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert key in str(info.value)


def test_not_toml_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "port = = 3"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_selection_rules_override_defaults_per_key(tmp_path):
    settings = load_settings(write(tmp_path, "allow_any_caller = true\n[selection.CT]\nmin_slices = 40\n"))
    rules = settings.selection_rules("CT")
    assert rules.min_slices == 40
    assert rules.allowed_orientations == ["axial"]  # untouched keys keep the CT default
    assert settings.selection_rules("MR").modality == "MR"
    with pytest.raises(ConfigError, match="selection.CT"):
        load_settings(write(tmp_path, "allow_any_caller = true\n[selection.CT]\nmin_slices = 'many'\n"))
