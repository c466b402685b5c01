"""Settings: the example file is complete and valid, env overrides win, bad values are named."""

import json
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


def test_settings_show_credentials_as_stars_but_keep_them_for_use(tmp_path):
    password, token = "Pg-s3cret-4711", "tok-9f8e7d6c5b4a3210"
    settings = load_settings(write(tmp_path, (
        'allow_any_caller = true\n'
        f'database_url = "postgresql+psycopg://headscreen:{password}@db.example/headscreen"\n'
        'destinations = [{ name = "web", kind = "stow", url = "https://pacs/dicom-web/studies", '
        f'authorization = "Bearer {token}" }}]\n')))
    assert settings.database_url.endswith(f":{password}@db.example/headscreen")  # the service still connects
    assert settings.destinations[0].authorization == f"Bearer {token}"
    redacted = settings.redacted()
    assert redacted["database_url"] == "postgresql+psycopg://headscreen:***@db.example/headscreen"
    assert redacted["destinations"][0]["authorization"] == "Bearer ***"
    # repr() and str() end up in tracebacks and log lines.
    for text in (repr(settings), str(settings), repr(settings.destinations[0]), str(redacted)):
        assert password not in text and token not in text


def test_unset_credentials_stay_visibly_unset(tmp_path):
    settings = load_settings(write(tmp_path, (
        f'allow_any_caller = true\nstorage_dir = "{tmp_path}"\n'
        'destinations = [{ name = "web", kind = "stow", url = "https://pacs/dicom-web/studies" }]\n')))
    redacted = settings.redacted()
    assert redacted["database_url"] == f"sqlite:///{tmp_path / 'headscreen.db'}"
    assert redacted["destinations"][0]["authorization"] is None


def test_a_validation_message_that_quotes_a_secret_is_redacted(tmp_path):
    # The selection rules' message quotes the rejected input; a secret pasted there must not be shown.
    secret = "Pg-s3cret-4711"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, (
            'allow_any_caller = true\n'
            f'database_url = "postgresql+psycopg://hs:{secret}@db/hs"\n'
            f'[selection.CT]\nmin_slices = "{secret}"\n')))
    assert "selection.CT" in str(info.value) and secret not in str(info.value)


def test_a_secret_from_the_environment_is_redacted_in_validation_messages(tmp_path, monkeypatch):
    secret = "tok-9f8e7d6c5b4a3210"
    monkeypatch.setenv("HEADSCREEN_DESTINATIONS", json.dumps(
        [{"name": "web", "kind": "stow", "url": "https://pacs/dicom-web/studies", "authorization": secret}]))
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f'allow_any_caller = true\n[selection.CT]\nmin_slices = "{secret}"\n'))
    assert "selection.CT" in str(info.value) and secret not in str(info.value)
