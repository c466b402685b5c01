"""deploy/Containerfile read and its steps run without a container engine (CI has none).

Each stage gets a folder standing in for its root file system: an absolute path of the
image (/src, /dist, /var/lib/headscreen) becomes that folder's path, in COPY, WORKDIR,
ENV values and RUN commands alike. `FROM python:3.11-slim` becomes a fresh
`python -m venv` made from this environment's base interpreter (its pip, no packages,
and nothing of this machine's Debian extras on the PATH of the command the image runs).
RUN commands run as written, with `sh -c`, after the path mapping; `useradd` and `chown`
(root's business, and no such user here) are recorded instead of run. An instruction
this runner does not know fails the test, so a new step in the Containerfile cannot be
skipped unseen.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from wheel_helpers import REPO, python_base

CONTAINERFILE = REPO / "deploy" / "Containerfile"
COMPOSE = REPO / "deploy" / "compose.yaml"
# Tools the RUN steps may call that must not touch this machine: recorded, not run.
RECORDED_TOOLS = ("useradd", "chown")
# What python:3.11-slim sets besides PATH (docker inspect python:3.11-slim).
IMAGE_ENV = {"LANG": "C.UTF-8"}
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?=[\w.*-])[\w./*-]*")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    flags: dict[str, str]  # --from=wheel, --interval=30s, ...
    args: str  # the rest of the line, continuation lines joined


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[Instruction] = field(default_factory=list)

    def last(self, keyword: str) -> Instruction | None:
        found = [step for step in self.steps if step.keyword == keyword]
        return found[-1] if found else None

    def all(self, keyword: str) -> list[Instruction]:
        return [step for step in self.steps if step.keyword == keyword]


def parse_containerfile(path: Path = CONTAINERFILE) -> list[Stage]:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Containerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        # Flags come first: FROM's --platform, COPY's --from, HEALTHCHECK's timings.
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        step = Instruction(keyword.upper(), flags, rest)
        if step.keyword == "FROM":
            base, _, name = rest.partition(" AS ") if " AS " in rest else rest.partition(" as ")
            stages.append(Stage(base.strip(), name.strip() or None))
        else:
            assert stages, f"{line!r} before FROM"
            stages[-1].steps.append(step)
    return stages


def exec_form(args: str) -> list[str]:
    """A JSON array (CMD ["sh", "-c", ...]) as its list; shell form is refused here."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    """The HEALTHCHECK's command (`CMD [...]`) as an exec list."""
    step = stage.last("HEALTHCHECK")
    assert step is not None, "no HEALTHCHECK in the image"
    keyword, _, command = step.args.partition(" ")
    assert keyword == "CMD", step.args
    return exec_form(command)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for step in stage.all("ENV"):
        key, _, value = step.args.partition("=")
        assert key and value and " " not in key, f"ENV {step.args!r}: one KEY=value per ENV line"
        env[key] = value
    return env


@dataclass
class StageRoot:
    """A folder standing in for one stage's root file system, and its stand-in Python."""

    root: Path
    python: Path  # the fresh venv standing in for the base image's /usr/local
    workdir: str = "/"
    recorded: Path = field(init=False)
    tools: Path = field(init=False)

    def __post_init__(self) -> None:
        self.recorded = self.root.parent / f"{self.root.name}-recorded.txt"
        self.tools = self.root.parent / f"{self.root.name}-tools"
        self.tools.mkdir(parents=True, exist_ok=True)
        for tool in RECORDED_TOOLS:
            shim = self.tools / tool
            shim.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{self.recorded}"\n')
            shim.chmod(0o755)

    def path(self, image_path: str) -> Path:
        """Where an image path lives here (relative ones from the WORKDIR)."""
        absolute = image_path if image_path.startswith("/") else f"{self.workdir.rstrip('/')}/{image_path}"
        return self.root / absolute.lstrip("/")

    def map_paths(self, text: str) -> str:
        return _ABSOLUTE_PATH.sub(lambda m: str(self.root / m.group(0).lstrip("/")), text)

    def run_env(self) -> dict[str, str]:
        """A RUN step's environment: the stand-in Python first, this machine's tools after
        it (as a build container has a Debian base); pip keeps this machine's registry
        settings (PIP_*), with an empty HOME."""
        home = self.root / "root"
        home.mkdir(exist_ok=True)
        pip = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
        return {**pip, **IMAGE_ENV, "HOME": str(home),
                "PATH": f"{self.python / 'bin'}:{self.tools}:/usr/bin:/bin"}

    def recorded_calls(self) -> list[str]:
        return self.recorded.read_text().splitlines() if self.recorded.exists() else []


def new_stage_root(root: Path, base: str) -> StageRoot:
    """An empty root and a fresh venv for `FROM base` (only python:X.Y images here)."""
    match = re.fullmatch(r"python:(\d+)\.(\d+)(?:[.\w-]*)", base)
    assert match, f"FROM {base}: this runner stands in for python:X.Y images only"
    interpreter = python_base()
    version = subprocess.run([interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    wanted = f"{match.group(1)}.{match.group(2)}"
    assert version == wanted, f"FROM {base}: this machine's Python is {version}, the image's {wanted}"
    root.mkdir(parents=True)
    venv = root.parent / f"{root.name}-python"
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    return StageRoot(root, venv)


def copy_into(stage: StageRoot, step: Instruction, stages: dict[str, StageRoot]) -> None:
    """COPY [--from=stage] SRC... DEST: from the repository (the build context) or a stage."""
    *sources, dest = shlex.split(step.args)
    source_root = stages[step.flags["from"]].root if "from" in step.flags else REPO
    target = stage.path(dest)
    into_folder = dest.endswith("/") or len(sources) > 1
    for source in sources:
        origin = source_root / source.lstrip("/")
        assert origin.exists(), f"COPY {source}: not in the build context"
        if origin.is_dir():
            # A folder's contents go to DEST, links as links (headscreen/daemon -> ../daemon), as COPY does.
            shutil.copytree(origin, target, symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            destination = target / origin.name if into_folder else target
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, destination)


def run_step(stage: StageRoot, step: Instruction, timeout_s: float = 1200) -> float:
    """A RUN command as written (paths mapped), in the stage's WORKDIR; its seconds."""
    command = stage.map_paths(step.args)
    # Every absolute path now lies inside the stage's folder (`rm -rf /tmp/dist` included).
    outside = [p for p in _ABSOLUTE_PATH.findall(command) if not p.startswith(f"{stage.root}/")]
    assert not outside, f"RUN {step.args}: paths left unmapped: {outside}"
    started = time.monotonic()
    result = subprocess.run(["sh", "-c", command], cwd=stage.path(stage.workdir), env=stage.run_env(),
                            capture_output=True, text=True, timeout=timeout_s)
    output = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"RUN {step.args}\nexit {result.returncode}\n{output}"
    return time.monotonic() - started


@dataclass
class BuiltImage:
    """The last stage after its build steps: what the image's CMD runs with."""

    stage: Stage
    root: StageRoot
    user: str | None
    env: dict[str, str]  # the image's ENV, paths mapped
    exposed: list[int]
    cmd: list[str]
    build_seconds: dict[str, float]

    def command_env(self, home: str) -> dict[str, str]:
        """The environment a container of this image starts with: its ENV, the user's
        HOME, and a PATH holding the stand-in Python and `sh` only (no Debian extras)."""
        bare = self.root.root.parent / "container-path"
        bare.mkdir(exist_ok=True)
        if not (bare / "sh").exists():
            (bare / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
        return {**IMAGE_ENV, **self.env, "HOME": str(self.root.path(home)),
                "PATH": f"{self.root.python / 'bin'}:{bare}"}


def build(folder: Path, containerfile: Path = CONTAINERFILE) -> BuiltImage:
    """Run every stage's steps; the last stage as a BuiltImage."""
    stages = parse_containerfile(containerfile)
    roots: dict[str, StageRoot] = {}
    seconds: dict[str, float] = {}
    for index, stage in enumerate(stages):
        root = new_stage_root(folder / f"stage{index}", stage.base)
        user, exposed, cmd = None, [], []
        for step in stage.steps:
            if step.keyword == "WORKDIR":
                root.workdir = step.args
                root.path(step.args).mkdir(parents=True, exist_ok=True)
            elif step.keyword == "COPY":
                copy_into(root, step, roots)
            elif step.keyword == "RUN":
                seconds[step.args] = run_step(root, step)
            elif step.keyword == "USER":
                user = step.args
            elif step.keyword == "EXPOSE":
                exposed += [int(port.split("/")[0]) for port in step.args.split()]
            elif step.keyword == "CMD":
                cmd = exec_form(step.args)
            elif step.keyword not in ("ENV", "HEALTHCHECK", "STOPSIGNAL"):
                raise AssertionError(f"{step.keyword} {step.args}: not a step this runner knows")
        roots[stage.name or str(index)] = root
    last = stages[-1]
    env = {key: root.map_paths(value) for key, value in env_of(last).items()}
    return BuiltImage(last, root, user, env, exposed, cmd, seconds)
