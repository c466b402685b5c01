"""deploy/Containerfile's steps, run the way CI can (no container engine here): the COPY
lines into a fresh build folder, its `pip wheel`, a fresh venv for python:3.11-slim, its
`pip install` of the wheel, then its CMD as written, with compose's database setting
(a fresh PostgreSQL database), a configuration at the image's HEADSCREEN_CONFIG, and
neither this machine's Debian extras on the PATH nor its mricron-data readable. A phantom
CT study sent with dcmtk's storescu is screened and its results reach a receiving peer
(the code, the bundles and Colin27 all from the installed wheel, and no torch);
what was stored is not world-readable (the CMD's umask); the console answers on a
non-loopback address and asks for a login; the image's HEALTHCHECK passes.

pip reaches the package index this machine is configured with (PIP_* is kept, HOME is
not): the build needs setuptools, the install ~60 dependencies, as in a real build.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from conftest import create_pg_database, drop_pg_database
from container_helpers import COMPOSE, BuiltImage, build, healthcheck_command
from headscreen.daemon.orthanc import free_port
from serve_harness import Daemon, RecordingSCP, storescu, wait_until
from wheel_helpers import (
    HIDDEN_MARK,
    assert_screened,
    bundle_dirs,
    hide_debian_templates,
    phantom_ct_study,
    readable_by_others,
    require_dcmtk,
    venv_python,
)

pytestmark = pytest.mark.slow  # two venvs, a wheel build, ~60 packages installed, a study screened


@dataclass
class ContainerDaemon(Daemon):
    """The image's CMD, run as written in the built stand-in (cwd = WORKDIR)."""

    image: BuiltImage | None = None
    env: dict[str, str] | None = None

    def start(self, timeout_s: float = 180.0) -> ContainerDaemon:
        assert self.image is not None and self.env is not None
        log = (self.workdir / "serve.log").open("ab")
        self.process = subprocess.Popen(self.image.cmd, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.image.root.path(self.image.root.workdir), env=self.env,
                                        start_new_session=True)
        wait_until(self.echo, timeout_s, 0.5, "C-ECHO from the image's CMD")
        return self


def outward_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("203.0.113.1", 9))  # a documentation address: routed, never broadcast
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.fail("no non-loopback IPv4 address to reach the console from outside", pytrace=False)
    return address


def http_status(url: str) -> int:
    request = urllib.request.Request(url)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect is an answer to look at, not to follow
        return None


def useradd_home(image: BuiltImage) -> str:
    """The image user's home folder (its HOME in a container), from the useradd step."""
    for step in image.stage.all("RUN"):
        for command in step.args.split("&&"):
            words = shlex.split(command)
            if words and words[0] == "useradd":
                assert words[-1] == image.user, (words, image.user)
                return words[words.index("--home") + 1]
    raise AssertionError("no useradd step makes the image's USER")


@pytest.mark.timeout(2400)  # a wheel build and ~60 packages installed, on a busy machine
def test_the_containerfile_steps_build_an_image_that_screens(tmp_path: Path) -> None:
    require_dcmtk()
    started = time.monotonic()
    image = build(tmp_path / "build")
    print(f"\nContainerfile steps run in {time.monotonic() - started:.0f} s: "
          + "; ".join(f"{cmd.split()[0:2]} {s:.0f} s" for cmd, s in image.build_seconds.items()))
    assert image.cmd == ["sh", "-c", "umask 0027 && exec headscreen serve"]
    assert image.user == "headscreen"
    home = useradd_home(image)
    assert image.root.path(home).is_dir() and image.root.path(home).stat().st_mode & 0o777 == 0o750
    assert any(call.startswith("useradd --system") for call in image.root.recorded_calls())
    assert not image.root.path("/tmp/dist").exists()  # the wheel is not left in the image

    # The installed code, bundles and template are the image's own; no torch; no Debian Colin27.
    site = hide_debian_templates(image.root.python)
    where = json.loads(venv_python(image.root.python, (
        "import json, importlib.util, headscreen.daemon as daemon, headscreen.imaging.templates as t\n"
        "import headscreen.daemon.config as c\n"
        "try:\n    open('/usr/share/mricron/templates/ch2.nii.gz', 'rb')\n    hidden = False\n"
        "except FileNotFoundError:\n    hidden = True\n"
        "print(json.dumps({'daemon': daemon.__file__, 'colin': str(t.colin27_path()), 'hidden': hidden,\n"
        "  'bundles': [str(p) for p in c.shipped_bundles()],\n"
        "  'torch': importlib.util.find_spec('torch') is not None}))\n"
    )))
    assert where["daemon"].startswith(str(site)) and where["colin"].startswith(str(site)), where
    assert where["hidden"] and not where["torch"], where
    assert sorted(Path(p).name for p in where["bundles"]) == [p.name for p in bundle_dirs()]
    assert all(p.startswith(str(site / "headscreen" / "models")) for p in where["bundles"])

    # What compose gives the container: its database URL (pointed at a fresh database here).
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["headscreen"]
    compose_url = make_url(re.sub(r"\$\{[^}]*\}", "secret", compose["environment"]["HEADSCREEN_DATABASE_URL"]))
    assert compose_url.drivername == "postgresql+psycopg" and compose_url.host == "db"
    db_name, db_url = create_pg_database()

    study, study_uid = phantom_ct_study(tmp_path / "study")
    destination = RecordingSCP(tmp_path / "pacs")
    web_port = free_port()
    config_dir = Path(image.env["HEADSCREEN_CONFIG"]).parent  # mapped into the stand-in root
    daemon = ContainerDaemon(config_dir, destinations=[("pacs", destination.ae_title, destination.port)],
                             web_port=web_port, database_url=db_url, extra="overlay_slices = 6\n", image=image)
    # The configuration an admin mounts at HEADSCREEN_CONFIG: storage at the image's WORKDIR.
    storage = image.root.path(image.root.workdir)
    assert Path(image.env["HEADSCREEN_CONFIG"]) == daemon.config
    daemon.config.write_text(daemon.config.read_text().replace(f'storage_dir = "{daemon.storage}"',
                                                               f'storage_dir = "{storage}"'))
    assert 'bind_address = "127.0.0.1"' in daemon.config.read_text().split("[web]")[1]  # the image's ENV wins
    daemon.storage = storage
    daemon.env = {**image.command_env(home), "HEADSCREEN_DATABASE_URL": db_url}
    health = healthcheck_command(image.stage)
    try:
        # Nothing listens yet: the image's health check fails.
        assert subprocess.run(health, env=daemon.env, capture_output=True, timeout=60).returncode != 0
        daemon.start()
        # The health check passes once serve is ready (the receiver, a sweep, the workers).
        wait_until(lambda: subprocess.run(health, env=daemon.env, capture_output=True, timeout=60).returncode == 0,
                   180, 2.0, "the image's HEALTHCHECK to pass")
        storescu(study, daemon.port)
        wait_until(daemon.all_delivered, 300, 1.0, "results delivered by the image's serve")
        print(f"serve started, study screened and delivered in {time.monotonic() - started:.0f} s")
        assert_screened(daemon, destination, study_uid)

        # The console from outside: every address, and nothing without a login.
        outside = f"http://{outward_address()}:{web_port}"
        assert http_status(f"{outside}/login") == 200
        assert http_status(f"{outside}/api/v1/studies") == 401
        assert http_status(f"{outside}/") == 303  # to /login
        assert http_status(f"{outside}/healthz") == 200
        assert http_status(f"{outside}/static/style.css") == 200  # the console's files, from the wheel

        # exec: the Popen'd sh became headscreen, so SIGTERM reaches it and it drains.
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(120) == 0, daemon.log_tail()
    finally:
        daemon.close()
        destination.stop()
        drop_pg_database(db_name)

    stored = [p for p in storage.rglob("*") if p.is_file()]
    assert any(p.suffix == ".dcm" and "results" not in p.parts for p in stored), "no received instance stored"
    assert any("results" in p.relative_to(storage).parts for p in stored), "no result file stored"
    assert readable_by_others(storage) == []
    log = (config_dir / "serve.log").read_text()
    # No process died of an exception (a logged one is kept as frames, without its message).
    assert HIDDEN_MARK not in log and "Traceback (most recent call last)" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if " ERROR " in line]
    print(f"ERROR lines in serve.log: {len(errors)}", *errors[:5], sep="\n  ")
