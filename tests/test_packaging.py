"""The wheel holds every package and the console script (what `pip install .` gives)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness import REPO


def test_wheel_contents(tmp_path: Path) -> None:
    # Built from a copy of the sources: setuptools reuses a checkout's build/ directory,
    # where modules that no longer exist could linger and hide in (or leak into) the wheel.
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = list(tmp_path.glob("midbridge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("bridge", "probes"):
        sources = sorted(p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*.py"))
        assert sources
        missing = [s for s in sources if s not in names]
        assert not missing, f"not in the wheel: {missing}"
    assert "bridge/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "midbridge = bridge.cli:main" in text
    assert not any(n.startswith("tests/") for n in names)
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"bridge", "probes"}, "the wheel installs bridge and probes only"


# --- the lock: constraints.txt (scripts/lock) ---------------------------------------------

LOCK = REPO / "constraints.txt"


def locked_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[canonicalize_name(name)] = version.strip()
    return pins


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    texts = [*project["dependencies"], *(text for extra in extras.values() for text in extra)]
    return [Requirement(text) for text in texts]


def test_lock_pins_every_declared_dependency_within_its_range() -> None:
    pins = locked_pins()
    for requirement in declared_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject.toml but not in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_installed_versions_are_the_locked_ones() -> None:
    """What scripts/test installed is the lock (`scripts/test --latest` deselects this)."""
    drift = {}
    for name, version in locked_pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a package of another platform or Python (none on CI's)
        if installed != version:
            drift[name] = (version, installed)
    assert not drift, f"installed versions differ from constraints.txt: {drift}"


def test_every_install_path_uses_the_lock() -> None:
    readme = (REPO / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "midbridge demo" in line)
    # The demo's libraries are the `demo` extra; command 1 is still one line.
    assert "pip install -c constraints.txt '.[demo]'" in first, first
    dockerfile = (REPO / "compose" / "Dockerfile").read_text()
    installs = [ln for ln in dockerfile.splitlines() if "pip install" in ln]
    assert installs
    assert all("-c constraints.txt" in ln for ln in installs), installs
    assert 'install --quiet -c "$LOCK"' in (REPO / "scripts" / "test").read_text()


def quiet_run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run with Python's default warning filters (not pytest's) and no -W from outside."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_commands_print_no_warnings() -> None:
    """cryptography's DSA deprecation, raised while asyncssh imports, is not shown."""
    midbridge = str(Path(sys.executable).with_name("midbridge"))
    help_run = quiet_run(midbridge, "--help")
    assert help_run.returncode == 0
    assert help_run.stderr == ""
    imports = quiet_run(
        sys.executable, "-c", "import bridge.demo.loop, bridge.demo.targets, probes.ssh, asyncssh"
    )
    assert imports.returncode == 0, imports.stderr
    assert imports.stderr == ""


def test_the_dsa_filter_is_narrow() -> None:
    """The same warning from any module but asyncssh's is still shown."""
    code = (
        "import bridge, warnings\n"
        "from cryptography.utils import CryptographyDeprecationWarning as W\n"
        "warnings.warn_explicit('DSA is deprecated', W, 'x.py', 1, module='ours')\n"
        "warnings.warn_explicit('RSA is deprecated', W, 'x.py', 2, module='asyncssh.x')\n"
    )
    run = quiet_run(sys.executable, "-c", code)
    assert "DSA is deprecated" in run.stderr
    assert "RSA is deprecated" in run.stderr


# --- extras, the one version source, metadata ------------------------------------------------


def project_table() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project


def test_demo_and_bench_libraries_are_extras() -> None:
    project = project_table()
    required = {canonicalize_name(Requirement(t).name) for t in project["dependencies"]}
    extras = project["optional-dependencies"]
    for extra in ("demo", "bench"):
        names = {canonicalize_name(Requirement(t).name) for t in extras[extra]}
        assert names == {"amqtt", "pysnmp"}, extra
        assert not names & required, f"{extra}'s libraries are not required by every install"
    # The test tools run the demo's and the benchmarks' tests.
    assert {"amqtt", "pysnmp"} <= {canonicalize_name(Requirement(t).name) for t in extras["test"]}


def test_demo_without_its_extra_is_a_one_line_error() -> None:
    """As after a plain ``pip install .``: amqtt and pysnmp cannot be imported."""
    code = (
        "import sys\n"
        "sys.modules['amqtt'] = None; sys.modules['pysnmp'] = None\n"
        "from bridge.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    run = quiet_run(sys.executable, "-c", code)
    assert run.returncode == 2, run
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("midbridge: error: the demo and the benchmarks need the 'demo'")
    assert "amqtt, pysnmp" in lines[0]
    assert "pip install -c constraints.txt '.[demo]'" in lines[0]


def test_one_version_source() -> None:
    import bridge

    version = project_table()["version"]
    assert metadata.version("midbridge") == version
    assert bridge.__version__ == version
    written = [
        p.relative_to(REPO).as_posix()
        for p in (REPO / "bridge").rglob("*.py")
        if re.search(r"""__version__ = ["']\d+\.""", p.read_text())
    ]
    assert not written, f"a version written outside pyproject.toml: {written}"
    run = quiet_run(str(Path(sys.executable).with_name("midbridge")), "--version")
    assert run.stdout.strip() == f"midbridge {version}"


def test_project_metadata() -> None:
    project = project_table()
    classifiers = project["classifiers"]
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Typing :: Typed" in classifiers
    assert project["requires-python"] == ">=3.11"
    assert project["license"] == "Apache-2.0"
