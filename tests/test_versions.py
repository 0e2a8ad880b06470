"""The version policy: pyproject.toml's ranges are mmtune.versions' tested ones, the lock lies
inside them and is what `make` installs, `make test-latest` installs without it (UNCAPPED=1:
beyond the upper bounds), and `import mmtune` warns once outside transformers' tested range."""

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from mmtune.versions import TESTED_RANGES, in_tested_range, untested_message

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _project():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _requirements(extras=("dev",)):
    project = _project()
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _lock():
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{LOCK}: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_pyproject_declares_the_tested_ranges():
    declared = {canonicalize_name(r.name): r.specifier for r in _requirements(extras=())}
    for name, spec in TESTED_RANGES.items():
        assert declared[canonicalize_name(name)] == SpecifierSet(spec), name
    assert not any(s.operator == "<" for s in declared["torch"])  # torch: the lock pins the build, no range claimed


def test_the_lock_satisfies_pyproject_and_pins_torch():
    pins = _lock()
    env = default_environment()
    for requirement in _requirements():
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{LOCK.name} lacks {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    for name in ("torch", "torchvision", "pip"):
        assert name in pins
    assert "mmtune" not in pins


def test_tested_range_bounds():
    assert in_tested_range("transformers", "5.17.0") and in_tested_range("transformers", "5.25.3")
    assert in_tested_range("transformers", "5.16.1") is False
    assert in_tested_range("transformers", "5.26.0") is False
    assert in_tested_range("transformers", "5.26.0.dev0") is False  # a build of the next minor
    assert in_tested_range("transformers", None) is None and in_tested_range("pillow", "12.0") is None
    assert "transformers>=5.17,<5.26" in untested_message("transformers", "5.26.0")


@pytest.mark.parametrize("version,warned", [("5.26.0", True), ("5.25.0", False)])
def test_import_warns_outside_the_tested_range(version, warned):
    code = ("import importlib.metadata as m, warnings\n"
            "real = m.version\n"
            f"m.version = lambda name: {version!r} if name == 'transformers' else real(name)\n"
            "warnings.simplefilter('always')\n"
            "import mmtune\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "UntestedVersionWarning" in line]
    assert len(lines) == (1 if warned else 0), out.stderr
    if warned:
        assert f"transformers {version} is installed" in lines[0] and "make test-latest UNCAPPED=1" in lines[0]


def test_import_warning_appears_once_per_process():
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda name: '5.30.0' if name == 'transformers' else real(name)\n"
            "import mmtune\nimport mmtune.env\nimport mmtune.versions\nimport mmtune\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("UntestedVersionWarning") == 1, out.stderr


def _dry_run(*args):
    if shutil.which("make") is None:
        pytest.fail("make is not installed: the Makefile cannot be checked")
    # a clean environment: under `make test-latest UNCAPPED=1` make hands its variables down (MAKEFLAGS)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "UNCAPPED")}
    out = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if "pip install" in line]


def test_make_installs_the_lock_and_rebuilds_when_it_changes():
    installs = _dry_run("venv")
    assert installs and all("-c requirements/lock.txt" in line for line in installs)
    stamp_rule = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("$(STAMP):"))
    assert "$(LOCK)" in stamp_rule and "pyproject.toml" in stamp_rule


def test_make_test_latest_installs_without_the_lock_and_uncapped_lifts_the_bounds():
    capped = _dry_run("test-latest")
    assert not any("requirements/lock.txt" in line for line in capped)  # only torch's pins come from it
    assert any("--upgrade" in line and '".[dev]"' in line for line in capped)
    uncapped = _dry_run("test-latest", "UNCAPPED=1")
    assert any("uncapped.txt" in line for line in uncapped)


def test_uncapped_requirements_drop_upper_bounds():
    spec = importlib.util.spec_from_file_location("uncapped", ROOT / "requirements" / "uncapped.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.uncapped("transformers>=5.17,<5.26") == "transformers>=5.17"
    assert module.uncapped("peft ~= 0.21") == "peft>=0.21"
    assert module.uncapped("torch==2.14.1") == "torch"
    assert module.uncapped('soundfile>=0.12,<1; sys_platform == "linux"') == 'soundfile>=0.12; sys_platform == "linux"'
    for requirement in _requirements():  # every requirement of the project passes through
        text = module.uncapped(str(requirement))
        assert not re.search(r"<|==", text.split(";")[0]), text
