"""The lab pipeline templates in ci/ run the README's commands, name only what exists, keep the results.

A template that drifts from the README (a renamed script, a dropped --xunit, an artifact path
nothing writes) fails here rather than in a lab's first pipeline run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# What the commands write: every artifact a template keeps must be one of these or inside one.
OUTPUTS = ("preflight.json", "results", "qual")


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- pipeline-commands -->\n```sh\n(.*?)```", text, re.DOTALL)
    assert block is not None, "README.md has no pipeline-commands block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _lines(script: str | list[str]) -> list[str]:
    items = [script] if isinstance(script, str) else script
    return [line.strip() for item in items for line in item.splitlines() if line.strip()]


def gitlab() -> tuple[list[str], list[str]]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "ci" / "gitlab-ci.yml").read_text())
    jobs = {name: job for name, job in doc.items() if isinstance(job, dict) and "script" in job}
    stages = doc["stages"]
    commands: list[str] = []
    artifacts: list[str] = []
    for job in sorted(jobs.values(), key=lambda j: stages.index(j["stage"])):
        commands += _lines(job.get("before_script", [])) + _lines(job["script"])
        artifacts += job.get("artifacts", {}).get("paths", [])
        assert job.get("artifacts", {}).get("when") == "always", f"artifacts of {job} are lost on failure"
        junit = job.get("artifacts", {}).get("reports", {}).get("junit")
        if junit:
            artifacts.append(junit)
    assert jobs["qualify"].get("when") == "always", "the qualification must run after a failed main job"
    return commands, artifacts


def github() -> tuple[list[str], list[str]]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "ci" / "github-workflow.yml").read_text())
    (job,) = doc["jobs"].values()
    commands: list[str] = []
    artifacts: list[str] = []
    for step in job["steps"]:
        if "run" in step:
            commands += _lines(step["run"])
        if str(step.get("uses", "")).startswith("actions/upload-artifact"):
            assert step.get("if") == "always()", "artifacts must be kept after a failure"
            artifacts += _lines(step["with"]["path"])
    qualify = next(s for s in job["steps"] if "run-qualify.sh" in s.get("run", ""))
    assert qualify.get("if") == "always()", "the qualification must run after a failed main job"
    return commands, artifacts


def jenkins() -> tuple[list[str], list[str]]:
    text = (REPO / "ci" / "Jenkinsfile").read_text()
    commands = [m.group(2).strip() for m in re.finditer(r"\bsh\s+(['\"])(.*?)\1", text)]
    archived = re.search(r"archiveArtifacts\s+artifacts:\s*'([^']*)'", text)
    junit = re.search(r"junit\s+testResults:\s*'([^']*)'", text)
    assert archived and junit, "the Jenkinsfile keeps no artifacts or no junit report"
    assert re.search(r"post\s*\{\s*always\s*\{", text), "artifacts must be kept after a failure"
    assert re.search(r"catchError\(buildResult: 'FAILURE'[^)]*\)\s*\{\s*sh 'ci/run-job.sh", text), \
        "a failed main job must fail the build and still let the qualification run"
    artifacts = [a.strip().removesuffix("/**") for a in archived.group(1).split(",")] + [junit.group(1)]
    return commands, artifacts


TEMPLATES = {"gitlab-ci.yml": gitlab, "github-workflow.yml": github, "Jenkinsfile": jenkins}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_runs_the_readmes_commands_in_order(name: str) -> None:
    commands, _ = TEMPLATES[name]()
    assert commands == readme_commands(), f"ci/{name} runs {commands}, the README says {readme_commands()}"


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_script_a_template_names_exists_and_is_executable(name: str) -> None:
    commands, _ = TEMPLATES[name]()
    for command in commands:
        for word in shlex.split(command):
            if word.startswith(("ci/", ".venv/")) or word.endswith(".sh"):
                if word.startswith(".venv/"):
                    assert word == ".venv/bin/gmemtest", f"ci/{name}: {word} is not the venv bootstrap-host.sh makes"
                    assert "gmemtest = gmemtest.cli:main" in (REPO / "setup.cfg").read_text()
                    continue
                path = REPO / word
                assert path.is_file(), f"ci/{name} names {word}, which does not exist"
                if command.startswith(word):
                    assert path.stat().st_mode & 0o111, f"ci/{name} runs {word}, which is not executable"


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_keeps_xunit_avocado_html_and_the_qualification(name: str) -> None:
    commands, artifacts = TEMPLATES[name]()
    assert any("--xunit results/xunit.xml" in c for c in commands), f"ci/{name}: no --xunit"
    assert "results/xunit.xml" in artifacts and any(a.rstrip("/") == "results" for a in artifacts), artifacts
    for wanted in ("qual/qualification.json", "qual/qualification.html", "preflight.json"):
        assert wanted in artifacts, f"ci/{name} does not keep {wanted}: {artifacts}"
    for path in artifacts:
        assert path.rstrip("/").split("/")[0] in OUTPUTS, f"ci/{name} keeps {path}, which no command writes"


def test_qualify_step_passes_incomplete_and_fails_failed() -> None:
    text = (REPO / "ci" / "run-qualify.sh").read_text()
    assert re.search(r'if \[ "\$status" -eq 3 \]; then.*?exit 0', text, re.DOTALL), text
    assert 'exit "$status"' in text
