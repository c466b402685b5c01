"""The deployment files: the systemd unit is hardened (checked key by key and scored by
`systemd-analyze security --offline=yes`), does not restart-loop on a bad configuration,
and the container files keep patient data private too."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "headscreen.service"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values in order (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT)


def test_unit_keeps_patient_data_private(unit) -> None:
    service = unit["Service"]
    assert service["UMask"] == ["0027"]
    assert service["StateDirectoryMode"] == ["0750"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == ["/var/lib/headscreen"]
    for key in ("ProtectHome", "PrivateTmp", "PrivateMounts"):
        assert service[key] == ["true"], key


@pytest.mark.parametrize("key, value", [
    ("NoNewPrivileges", "true"), ("CapabilityBoundingSet", ""), ("AmbientCapabilities", ""),
    ("PrivateDevices", "true"), ("PrivateUsers", "true"), ("ProtectClock", "true"),
    ("ProtectHostname", "true"), ("ProtectKernelTunables", "true"), ("ProtectKernelModules", "true"),
    ("ProtectKernelLogs", "true"), ("ProtectControlGroups", "true"), ("ProtectProc", "invisible"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"), ("RestrictNamespaces", "true"),
    ("RestrictRealtime", "true"), ("RestrictSUIDSGID", "true"), ("LockPersonality", "true"),
    ("MemoryDenyWriteExecute", "true"), ("RemoveIPC", "true"), ("SystemCallArchitectures", "native"),
])
def test_unit_sandbox_key(unit, key: str, value: str) -> None:
    assert unit["Service"][key] == [value]


def test_unit_filters_system_calls(unit) -> None:
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert unit["Service"]["SystemCallErrorNumber"] == ["EPERM"]


def test_a_bad_configuration_does_not_restart_loop(unit, tmp_path: Path) -> None:
    service = unit["Service"]
    assert service["Restart"] == ["on-failure"]
    assert int(unit["Unit"]["StartLimitBurst"][0]) <= 10
    assert int(unit["Unit"]["StartLimitIntervalSec"][0]) >= 60
    # A failing ExecStartPre would end the start before RestartPreventExitStatus applies.
    assert "ExecStartPre" not in service
    # The status the CLI exits with for an invalid configuration is the one not restarted.
    bad = tmp_path / "headscreen.toml"
    bad.write_text("port = 70000\n")
    result = subprocess.run([sys.executable, "-m", "headscreen", "-c", str(bad), "serve"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "invalid configuration" in result.stderr
    assert service["RestartPreventExitStatus"] == [str(result.returncode)]


def test_systemd_analyze_scores_the_unit_ok(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for headscreen\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout  # 1.2 when written; the old unit scored 8.7
    # verify wants the binary to exist: check a copy that runs /bin/true.
    copy = tmp_path / "headscreen.service"
    copy.write_text(UNIT.read_text().replace("/opt/headscreen/bin/headscreen", "/bin/true"))
    verify = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


def test_container_runs_with_umask_and_without_privileges() -> None:
    containerfile = (REPO / "deploy" / "Containerfile").read_text()
    assert 'CMD ["sh", "-c", "umask 0027 && exec headscreen serve"]' in containerfile
    assert "USER headscreen" in containerfile and "EXPOSE 11112 2762" in containerfile
    compose = (REPO / "deploy" / "compose.yaml").read_text()
    for line in ("restart: on-failure:5", "read_only: true", "cap_drop: [ALL]",
                 'security_opt: ["no-new-privileges:true"]'):
        assert line in compose, line


# --------------------------------------------------------------------------- what a wheel install needs

def _serve_without_default_bundles(config: Path) -> subprocess.CompletedProcess:
    """`headscreen serve` as if no default bundle were installed (none packaged, no models/)."""
    code = ("import sys, headscreen.daemon.config\n"
            "headscreen.daemon.config.shipped_bundles = lambda: []\n"
            "from headscreen.daemon.cli import main\n"
            f"sys.exit(main(['-c', {str(config)!r}, 'serve']))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_serve_refuses_to_start_without_a_usable_bundle(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    config = tmp_path / "headscreen.toml"
    config.write_text(f'allow_any_caller = true\nstorage_dir = "{storage}"\nport = 0\n[web]\nenabled = false\n')
    result = _serve_without_default_bundles(config)
    from headscreen.daemon.cli import EXIT_USAGE

    assert result.returncode == EXIT_USAGE == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no usable model bundle" in lines[0] and "set bundles" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not storage.exists()  # refused before anything was written
    # A configured bundle that is not there is refused the same way, naming it.
    config.write_text(config.read_text().replace("port = 0\n", f'port = 0\nbundles = ["{tmp_path / "nope"}"]\n'))
    missing = subprocess.run([sys.executable, "-m", "headscreen", "-c", str(config), "serve"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == 2 and "no such bundle folder" in missing.stderr, missing.stderr
    assert str(tmp_path / "nope") in missing.stderr and not storage.exists()


def test_a_serving_copy_of_a_bundle_needs_no_training_files(tmp_path: Path) -> None:
    import shutil

    from headscreen.bundle import TRAINING_ONLY_FILES, load_bundle
    from headscreen.daemon.config import shipped_bundles
    from headscreen.errors import BundleError

    source = shipped_bundles()[0]
    copy = tmp_path / source.name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*TRAINING_ONLY_FILES))
    assert load_bundle(copy).manifest.key == source.name
    # A training file that is there is still checked; one that serving reads may not be left out.
    (copy / "training_metrics.csv").write_text("tampered\n")
    with pytest.raises(BundleError, match="training_metrics.csv does not match"):
        load_bundle(copy)
    (copy / "training_metrics.csv").unlink()
    (copy / "normative.npz").unlink()
    with pytest.raises(BundleError, match="normative.npz listed in the manifest is missing"):
        load_bundle(copy)


def test_colin27_is_packaged_and_preferred(monkeypatch, tmp_path: Path) -> None:
    from headscreen.errors import ConfigError
    from headscreen.imaging import templates

    monkeypatch.delenv(templates.COLIN27_ENV, raising=False)
    assert templates.colin27_path() == templates.PACKAGED_COLIN27
    assert templates.PACKAGED_COLIN27.stat().st_size < 4_000_000
    if templates.DEBIAN_COLIN27.is_file():
        assert templates.PACKAGED_COLIN27.read_bytes() == templates.DEBIAN_COLIN27.read_bytes()
    monkeypatch.setenv(templates.COLIN27_ENV, str(tmp_path / "absent.nii.gz"))
    with pytest.raises(ConfigError, match="HEADSCREEN_COLIN27"):
        templates.colin27_path()


@pytest.mark.slow
def test_templates_are_identical_from_the_packaged_and_the_debian_colin27(monkeypatch) -> None:
    """The shipped models depend on the preprocessing: the atlas, its masks and the tissue
    maps must be the same arrays whichever copy of Colin27 they are built from."""
    import numpy as np
    import SimpleITK as sitk

    from headscreen.imaging import templates

    if not templates.DEBIAN_COLIN27.is_file():
        pytest.fail("Debian mricron-data missing: run tests/install-system-deps.sh", pytrace=False)
    cached = (templates.tissue_maps, templates.colin27_on_base, templates.atlas,
              templates.atlas_metric_mask, templates.atlas_brain_mask)

    def build(source: Path) -> dict[str, np.ndarray]:
        monkeypatch.setenv(templates.COLIN27_ENV, str(source))
        for function in cached:
            function.cache_clear()
        maps = templates.tissue_maps()
        arrays = {name: getattr(maps, name) for name in ("gm", "wm", "brain", "skull_depth", "head")}
        arrays |= {f"level{i}": level for i, level in enumerate(maps.parenchyma_levels)}
        arrays["colin"] = templates.colin27_on_base()
        for modality in ("CT", "MR"):
            arrays[f"atlas_{modality}"] = sitk.GetArrayFromImage(templates.atlas(modality))
        arrays["metric_mask"] = sitk.GetArrayFromImage(templates.atlas_metric_mask())
        return arrays

    try:
        packaged = build(templates.PACKAGED_COLIN27)
        debian = build(templates.DEBIAN_COLIN27)
    finally:
        for function in cached:
            function.cache_clear()
    assert packaged.keys() == debian.keys()
    for name in packaged:
        assert np.array_equal(packaged[name], debian[name]), name


def test_container_installs_the_wheel_not_the_source_tree() -> None:
    """The image gets the bundles and Colin27 from the wheel: no editable install, no
    models/ or weights in the final stage, no Debian mricron-data."""
    containerfile = (REPO / "deploy" / "Containerfile").read_text()
    final = containerfile.rsplit("\nFROM ", 1)[1]
    assert "pip wheel" in containerfile.rsplit("\nFROM ", 1)[0]
    assert "COPY --from=wheel" in final and "pip install --no-cache-dir /tmp/dist/headscreen-*.whl" in final
    assert "-e ." not in containerfile and "COPY models" not in final
    assert not [line for line in containerfile.splitlines() if line.startswith("RUN") and "mricron" in line]


# --------------------------------------------------------------------------- compose and the image's settings

def test_compose_starts_headscreen_after_a_healthy_database() -> None:
    import yaml
    from sqlalchemy.engine import make_url

    sys.path.insert(0, str(REPO / "tests"))
    from container_helpers import COMPOSE, env_of, healthcheck_command, parse_containerfile

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    db, headscreen = services["db"], services["headscreen"]
    # PostgreSQL is healthy when it answers over TCP (not the init server's socket).
    test = db["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready" and test[test.index("-h") + 1] == "127.0.0.1"
    assert db["restart"] == "unless-stopped"
    assert headscreen["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert re.fullmatch(r"on-failure:\d", headscreen["restart"])
    # The database URL names the db service, with the password from a required variable.
    url = headscreen["environment"]["HEADSCREEN_DATABASE_URL"]
    assert re.search(r":\$\{HEADSCREEN_DB_PASSWORD:\?[^}]+\}@", url), url
    assert db["environment"]["POSTGRES_PASSWORD"].startswith("${HEADSCREEN_DB_PASSWORD:?")
    parsed = make_url(re.sub(r"\$\{[^}]*\}", "secret", url))
    assert (parsed.host, parsed.username, parsed.database) == ("db", db["environment"]["POSTGRES_USER"],
                                                               db["environment"]["POSTGRES_DB"])
    # DICOM and the console published, on ports the image exposes and the defaults listen on.
    (image,) = [stage for stage in parse_containerfile() if stage.name is None]
    exposed = {int(p) for step in image.all("EXPOSE") for p in step.args.split()}
    published = {int(mapping.rsplit(":", 1)[1]) for mapping in headscreen["ports"]}
    from headscreen.daemon.config import Settings, WebConfig

    assert published == {Settings.model_fields["port"].default, WebConfig.model_fields["port"].default}
    assert published <= exposed
    # The image's readiness check, the same in compose (engines that drop HEALTHCHECK).
    assert headscreen["healthcheck"]["test"] == ["CMD", *healthcheck_command(image)]
    assert "/healthz" in healthcheck_command(image)[-1]
    assert env_of(image)["HEADSCREEN_WEB__BIND_ADDRESS"] == "0.0.0.0"


def test_multi_machine_compose_runs_one_receiver_and_workers(monkeypatch, tmp_path: Path) -> None:
    """deploy/compose.multi.yaml (docs/deployment.md): PostgreSQL, a receiver with no worker of
    its own, and workers that publish nothing; every headscreen service gets the same database
    and storage backend, and each one's environment is a valid configuration."""
    import yaml

    sys.path.insert(0, str(REPO / "tests"))
    from container_helpers import healthcheck_command, parse_containerfile
    from headscreen.daemon.config import Settings, WebConfig, load_settings

    services = yaml.safe_load((REPO / "deploy" / "compose.multi.yaml").read_text())["services"]
    assert set(services) == {"db", "receiver", "worker"}
    db, receiver, worker = services["db"], services["receiver"], services["worker"]
    assert db["healthcheck"]["test"][1] == "pg_isready"
    connections = int(db["command"][db["command"].index("-c") + 1].split("=", 1)[1])
    assert connections >= 100  # 20 workers at ~2 connections each, serve up to 15, the console, the CLI
    for service in (receiver, worker):
        assert service["depends_on"] == {"db": {"condition": "service_healthy"}}
        assert re.fullmatch(r"on-failure:\d", service["restart"])
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    shared = ("HEADSCREEN_DATABASE_URL", "HEADSCREEN_STORAGE_BACKEND")
    assert {k: receiver["environment"][k] for k in shared} == {k: worker["environment"][k] for k in shared}
    assert "@db/" in receiver["environment"]["HEADSCREEN_DATABASE_URL"]
    # The receiver receives and runs the console; the workers run `headscreen worker` and listen on nothing.
    published = {int(mapping.rsplit(":", 1)[1]) for mapping in receiver["ports"]}
    assert published == {Settings.model_fields["port"].default, WebConfig.model_fields["port"].default}
    (image,) = [stage for stage in parse_containerfile() if stage.name is None]
    assert receiver["healthcheck"]["test"] == ["CMD", *healthcheck_command(image)]
    assert "ports" not in worker and worker["healthcheck"] == {"disable": True}
    assert worker["command"][-1].endswith("exec headscreen worker")
    config = tmp_path / "headscreen.toml"
    config.write_text("allow_any_caller = true\n")
    seen = {}
    for name, service in (("receiver", receiver), ("worker", worker)):
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", "secret", value))
        seen[name] = load_settings(config)
        for key in service["environment"]:
            monkeypatch.delenv(key)
    assert seen["receiver"].workers == 0 and seen["worker"].workers >= 1
    assert seen["receiver"].storage_backend == seen["worker"].storage_backend == "postgresql"
    assert seen["receiver"].database_url == seen["worker"].database_url


def test_the_image_environment_opens_the_console_to_published_ports(monkeypatch, tmp_path: Path) -> None:
    """The image's ENV wins over a configuration that keeps the console on loopback."""
    sys.path.insert(0, str(REPO / "tests"))
    from container_helpers import env_of, parse_containerfile
    from headscreen.daemon.config import load_settings

    config = tmp_path / "headscreen.toml"
    config.write_text('allow_any_caller = true\n[web]\nbind_address = "127.0.0.1"\nport = 8080\n')
    assert load_settings(config).web.bind_address == "127.0.0.1"
    for key, value in env_of(parse_containerfile()[-1]).items():
        if key != "HEADSCREEN_CONFIG":
            monkeypatch.setenv(key, value)
    assert load_settings(config).web.bind_address == "0.0.0.0"


# --------------------------------------------------------------------------- serve waits for PostgreSQL

class TcpRelay:
    """Forwards a local port to PostgreSQL once started: a database that comes up late."""

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        import socketserver

        relay = self

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with socket.create_connection(upstream, timeout=30) as peer:
                    peer.settimeout(None)
                    pump = threading.Thread(target=relay._copy, args=(peer, self.request), daemon=True)
                    pump.start()
                    relay._copy(self.request, peer)
                    pump.join(30)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.port = port
        self._server_class = socketserver.ThreadingTCPServer
        self._handler = Pipe
        self.server: socketserver.ThreadingTCPServer | None = None

    @staticmethod
    def _copy(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

    def start(self) -> None:
        self.server = self._server_class(("127.0.0.1", self.port), self._handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.mark.postgres
def test_serve_waits_for_a_database_that_comes_up_late(tmp_path: Path) -> None:
    """compose's restart case: PostgreSQL not answering yet when serve starts."""
    from sqlalchemy.engine import make_url

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import PG_ADMIN_URL, create_pg_database, drop_pg_database
    from headscreen.daemon.orthanc import free_port
    from serve_harness import Daemon, have, wait_until

    if not have("echoscu"):
        pytest.fail("dcmtk (echoscu) missing: run tests/install-system-deps.sh", pytrace=False)
    admin = make_url(PG_ADMIN_URL)
    relay = TcpRelay(free_port(), (admin.host or "127.0.0.1", admin.port or 5432))
    name, url = create_pg_database()
    late_url = make_url(url).set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
    daemon = Daemon(tmp_path / "hs", database_url=late_url)
    failures: list[BaseException] = []

    def database_comes_up() -> None:
        try:
            wait_until(lambda: "database not reachable yet" in daemon.log_tail(), 90, 0.2, "the waiting log line")
            relay.start()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    opener = threading.Thread(target=database_comes_up, daemon=True)
    try:
        opener.start()
        daemon.start(timeout_s=150)
        opener.join(10)
        assert not failures, failures
        log = daemon.log_tail(200)
        assert "action=db_wait attempt=1" in log and "database reachable" in log, log
        assert "Traceback" not in log
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        daemon.close()
        relay.stop()
        drop_pg_database(name)


def test_serve_gives_up_on_a_database_that_never_answers(tmp_path: Path) -> None:
    """Bounded: after the wait, one line says why and serve exits 1 (runtime failure)."""
    from headscreen.daemon.cli import EXIT_FAILURE
    from headscreen.daemon.orthanc import free_port

    config = tmp_path / "headscreen.toml"
    config.write_text(f'allow_any_caller = true\nstorage_dir = "{tmp_path / "storage"}"\nport = 0\n'
                      f'database_url = "postgresql+psycopg://postgres@127.0.0.1:{free_port()}/headscreen"\n'
                      "[web]\nenabled = false\n")
    code = ("import sys, headscreen.daemon.serve\n"
            "headscreen.daemon.serve.DATABASE_WAIT_S = 3.0\n"
            "from headscreen.daemon.cli import main\n"
            f"sys.exit(main(['-c', {str(config)!r}, 'serve']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert result.returncode == EXIT_FAILURE == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    waits = [line for line in lines if "database not reachable yet; retrying for up to 3 s" in line]
    assert len(waits) >= 2 and "Connection refused" in waits[0], result.stderr
    assert "database not reachable after 3 s" in lines[-1] and "exit_code=1" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
