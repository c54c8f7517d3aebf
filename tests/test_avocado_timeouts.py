"""Nothing the main job runs can hang for ever: every test class has a timeout, the job has one too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _test_classes() -> list[tuple[Path, ast.ClassDef]]:
    found = []
    for path in sorted((REPO / "avocado_tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id == "Test" for b in node.bases):
                found.append((path, node))
    return found


def test_every_avocado_test_class_sets_a_timeout() -> None:
    classes = _test_classes()
    assert len(classes) >= 6, f"expected the guest, host and lab test classes, found {len(classes)}"
    missing = [f"{path.relative_to(REPO)}:{cls.name}" for path, cls in classes
               if not any(isinstance(stmt, ast.Assign)
                          and any(isinstance(t, ast.Name) and t.id == "timeout" for t in stmt.targets)
                          for stmt in cls.body)]
    assert not missing, f"Avocado test classes without a timeout: {missing}"


def test_the_job_script_passes_a_job_timeout() -> None:
    script = (REPO / "ci" / "run-job.sh").read_text()
    assert re.search(r"avocado run [^\n]*--job-timeout \"\$job_timeout\"", script), script
    assert re.search(r"job_timeout=\$\{GMEMTEST_JOB_TIMEOUT:-\d+\}", script)
