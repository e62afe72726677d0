"""The three images: hadolint finds nothing, they run as a numeric non-root user, and every
version they pin is inside pyproject.toml's range (and the same where two places name it)."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest
from observe_tools import REPO, run, tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from trainyard.operator.builders import DEFAULT_VLLM_IMAGE

IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Which pyproject requirements each image installs (the core always).
EXTRAS = {"operator": ["operator"], "trainer": ["train", "deepspeed"]}


def requirements(extras: list[str]) -> dict[str, Requirement]:
    found = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return {canonicalize_name(r.name): r for r in found}


def constraints(image: str) -> dict[str, Version]:
    pins = {}
    for line in (IMAGES / f"{image}.constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{image}.constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def instructions(dockerfile) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def pip_installs(dockerfile) -> list[list[str]]:
    """The arguments of every `pip install` in RUN lines."""
    found = []
    for instruction, arguments in instructions(dockerfile):
        if instruction == "RUN":
            for command in re.split(r"&&|;", arguments):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    found.append(words[2:])
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    result = run(tool("hadolint"), "--no-color", str(dockerfile))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_is_strict_here(tmp_path):
    """An unpinned pip install and a root user are findings, so the test above can fail."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:3.11.14-slim-bookworm\nRUN pip install --no-cache-dir kopf\n")
    result = run(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0 and "DL3013" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_numeric_non_root_user(dockerfile):
    users = [
        arguments for instruction, arguments in instructions(dockerfile) if instruction == "USER"
    ]
    assert users, f"{dockerfile.name} sets no USER: it would run as root"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].strip())
    assert match, (
        f"{dockerfile.name}: USER {users[-1]} is not numeric (runAsNonRoot cannot verify a name)"
    )
    assert int(match.group(1)) != 0 and int(match.group(2) or 1) != 0


@pytest.mark.parametrize("image", sorted(EXTRAS))
def test_constraints_pin_every_dependency_inside_pyprojects_range(image):
    wanted = requirements(EXTRAS[image])
    pins = constraints(image)
    assert not (missing := sorted(set(wanted) - set(pins))), f"{image}: not pinned: {missing}"
    outside = [
        f"{n}=={pins[n]} not in {wanted[n]}" for n in wanted if pins[n] not in wanted[n].specifier
    ]
    assert not outside, f"{image}.constraints.txt: " + "; ".join(outside)


@pytest.mark.parametrize("image", sorted(EXTRAS))
def test_every_pip_install_is_constrained(image):
    dockerfile = IMAGES / f"{image}.Dockerfile"
    copied = [a for i, a in instructions(dockerfile) if i == "COPY"]
    assert f"images/{image}.constraints.txt ./constraints.txt" in copied
    pins = constraints(image)
    for arguments in pip_installs(dockerfile):
        assert "--constraint" in arguments and "constraints.txt" in arguments, arguments
        for word in arguments:
            if word.startswith("-") or word == "constraints.txt" or word.startswith("."):
                continue
            name = canonicalize_name(Requirement(word).name)
            assert name in pins, f"{image}: pip installs {word} with no pin in constraints.txt"


def test_trainer_pins_the_torch_of_its_base_image_and_install_shs_deepspeed():
    (base,) = [a for i, a in instructions(IMAGES / "trainer.Dockerfile") if i == "FROM"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda.*", base.strip())
    assert match, base
    pins = constraints("trainer")
    assert pins["torch"] == Version(match.group(1))
    install = (REPO / "scripts" / "install.sh").read_text()
    assert f'"deepspeed=={pins["deepspeed"]}"' in install


def test_vllm_image_is_the_operators_default_and_inside_pyprojects_range():
    dockerfile = IMAGES / "vllm.Dockerfile"
    (base,) = [a for i, a in instructions(dockerfile) if i == "FROM"]
    assert base.strip() == DEFAULT_VLLM_IMAGE
    tag = Version(base.strip().rsplit(":v", 1)[1])
    ((installed,),) = pip_installs(dockerfile)
    requirement = Requirement(installed)
    assert requirement.name == "vllm" and str(requirement.specifier) == f"=={tag}"
    (allowed,) = [Requirement(r) for r in PYPROJECT["optional-dependencies"]["vllm"]]
    assert tag in allowed.specifier, f"vLLM {tag} is outside pyproject's {allowed}"


def test_operator_image_python_satisfies_requires_python():
    (base,) = [a for i, a in instructions(IMAGES / "operator.Dockerfile") if i == "FROM"]
    version = Version(re.match(r"python:(\d+\.\d+\.\d+)", base.strip()).group(1))
    assert version in Requirement(f"python{PYPROJECT['requires-python']}").specifier
