"""Settings: the example file is complete and valid, env overrides win, bad values are named."""

import json
import os
import tomllib
from pathlib import Path

import pytest

from headscreen.daemon.config import AUTO_RECEIVER_PROCESSES_MAX, Settings, example_toml, load_settings
from headscreen.errors import ConfigError


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
    monkeypatch.setenv("HEADSCREEN_DESTINATIONS",
                       '[{"name": "pacs", "ae_title": "PACS", "host": "10.1.1.1", "port": 104}]')
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
        ('allow_any_caller = true\ndestinations = [{ name = "p", ae_title = "P", host = "h", port = 0 }]',
         "destinations.0.port"),
        ("", "allowed_callers is empty"),
        ('allow_any_caller = true\ndatabase_url = "mysql://x"', "database_url"),
        ("allow_any_caller = true\n[receiver]\nprocesses = 0", "receiver.processes"),
        ('allow_any_caller = true\n[receiver]\nprocesses = "many"', "receiver.processes"),
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


# --- receiver hardening and DICOM TLS ------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from receiver_helpers import Pki

    return Pki(tmp_path_factory.mktemp("pki"))


def _tls_table(pki, **overrides) -> str:
    cert, key = pki.pair("server")
    values = {"enabled": True, "cert": str(cert), "key": str(key), "ca": str(pki.ca), **overrides}
    return "[receiver.tls]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def test_receiver_defaults_keep_plain_dicom_and_the_old_behaviour(tmp_path):
    settings = load_settings(write(tmp_path, "allow_any_caller = true\n"))
    assert settings.receiver.plain_dicom and not settings.receiver.check_called_ae_title
    assert not settings.receiver.tls.enabled


def test_receiver_processes_default_to_one_per_usable_core_up_to_a_cap(tmp_path, monkeypatch):
    settings = load_settings(write(tmp_path, "allow_any_caller = true\n"))
    assert settings.receiver.processes == "auto"
    for cores, expected in ((1, 1), (2, 2), (64, AUTO_RECEIVER_PROCESSES_MAX)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert settings.receiver.process_count() == expected
    chosen = load_settings(write(tmp_path, "allow_any_caller = true\n[receiver]\nprocesses = 3\n"))
    assert chosen.receiver.process_count() == 3  # a number is taken as it is


def test_receiver_tls_settings_reach_the_receiver(tmp_path, pki, monkeypatch):
    from headscreen.daemon.serve import receiver_config

    text = ('allowed_callers = [{ ae_title = "PACS" }]\n[receiver]\nmax_connections_per_address = 4\n'
            + _tls_table(pki, require_client_cert=True, port=2763)
            + 'caller_certificates = [{ ae_title = "PACS", subject_cn = "pacs.example" }]\n')
    monkeypatch.setenv("HEADSCREEN_RECEIVER__CHECK_CALLED_AE_TITLE", "true")
    config = receiver_config(load_settings(write(tmp_path, text)))
    assert config.check_called_ae_title and config.max_connections_per_address == 4 and config.plain
    assert config.tls is not None and config.tls.port == 2763 and config.tls.require_client_cert
    assert list(config.tls.caller_certificates) == [("PACS", "pacs.example")]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"cert": None}, "set cert and key"),
        ({"cert": "/nonexistent/server.crt"}, "cert /nonexistent/server.crt does not exist"),
        ({"key": "KEY_OF:client"}, "not a PEM certificate and its matching"),
        ({"ca": None, "require_client_cert": True}, "require_client_cert needs ca"),
        ({"ca": "/nonexistent/ca.crt"}, "ca /nonexistent/ca.crt does not exist"),
    ],
)
def test_bad_receiver_tls_files_stop_start_up_naming_the_file(tmp_path, pki, table, message):
    table = {k: (str(pki.pair(v.split(":")[1])[1]) if isinstance(v, str) and v.startswith("KEY_OF:") else v)
             for k, v in table.items()}
    text = "allow_any_caller = true\n" + _tls_table(pki, **{k: v for k, v in table.items() if v is not None})
    for key in (k for k, v in table.items() if v is None):
        text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} ="))
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert "receiver.tls" in str(info.value) and message in str(info.value), str(info.value)


def test_inconsistent_receiver_settings_are_named(tmp_path, pki):
    with pytest.raises(ConfigError, match="caller_certificates needs require_client_cert"):
        load_settings(write(tmp_path, "allow_any_caller = true\n" + _tls_table(pki)
                            + 'caller_certificates = [{ ae_title = "PACS", subject_cn = "x" }]\n'))
    with pytest.raises(ConfigError, match="plain_dicom = false needs"):
        load_settings(write(tmp_path, "allow_any_caller = true\n[receiver]\nplain_dicom = false\n"))
    with pytest.raises(ConfigError, match="receiver.max_connections_per_address"):
        load_settings(write(tmp_path, "allow_any_caller = true\n[receiver]\nmax_connections_per_address = 0\n"))


def test_an_encrypted_key_is_refused_instead_of_prompting(tmp_path, pki):
    import subprocess

    cert, key = pki.pair("server")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
                   check=True, capture_output=True, timeout=60)
    with pytest.raises(ConfigError, match="encrypted"):
        load_settings(write(tmp_path, "allow_any_caller = true\n" + _tls_table(pki, key=str(encrypted))))


def test_destination_tls_is_checked_at_load(tmp_path, pki):
    cert, key = pki.pair("client")

    def destination(tls: dict) -> str:
        table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in tls.items())
        return ('allow_any_caller = true\ndestinations = [{ name = "pacs", ae_title = "PACS", host = "10.0.0.5", '
                f'port = 2762, tls = {{ {table} }} }}]\n')

    settings = load_settings(write(tmp_path, destination({"ca": str(pki.ca), "cert": str(cert), "key": str(key)})))
    tls = settings.destinations[0].tls
    assert tls is not None and tls.ca == pki.ca and tls.check_hostname
    assert settings.redacted()["destinations"][0]["tls"]["cert"] == str(cert)
    with pytest.raises(ConfigError, match="cert and key must be given together"):
        load_settings(write(tmp_path, destination({"cert": str(cert)})))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(write(tmp_path, destination({"ca": "/nonexistent/ca.crt"})))
    with pytest.raises(ConfigError, match="tls is for kind 'dimse'"):
        load_settings(write(tmp_path, 'allow_any_caller = true\ndestinations = [{ name = "w", kind = "stow", '
                                      f'url = "https://pacs/dicom-web/studies", tls = {{ ca = "{pki.ca}" }} }}]\n'))


def test_a_default_another_layer_reads_is_written_once() -> None:
    """The job queue's attempts, the delivery retry policy and the receiver's options are
    the settings' defaults because they are taken from one place (issue 16, item 7): a
    different value there reaches the settings, not only an equal one written twice."""
    import subprocess
    import sys

    from headscreen.daemon.delivery import retry_policy
    from headscreen.daemon.receiver import ReceiverConfig
    from headscreen.daemon.worker import job_retry_policy
    from headscreen.db.types import RetryPolicy

    script = ("import headscreen.db.txn as txn, headscreen.db.types as types\n"
              "txn.DEFAULT_JOB_MAX_ATTEMPTS = 7\n"
              "types.RetryPolicy.max_attempts = 11\n"
              "from headscreen.daemon.config import DeliveryConfig, Settings\n"
              "print(Settings.model_fields['job_max_attempts'].default,"
              " DeliveryConfig.model_fields['max_attempts'].default)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["7", "11"]
    settings = Settings(allow_any_caller=True, job_max_attempts=5)
    assert job_retry_policy(settings).max_attempts == 5
    assert retry_policy(settings).max_attempts == RetryPolicy.max_attempts
    receiver = ReceiverConfig(ae_title="HEADSCREEN", storage_dir=Path("."))
    assert (receiver.port, receiver.maximum_associations) == (
        Settings.model_fields["port"].default, settings.receiver.max_associations)
