"""The committed Avocado files that mirror a registry are what the registry gives today."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gmemtest import avocado_files
from gmemtest.host_checks import HOST_CHECK_TABLE
from gmemtest.scenarios import SCENARIOS, Source
from guests.profiles import PROFILES


def test_the_committed_files_are_what_the_registries_give() -> None:
    assert avocado_files.stale() == [], "run: python -m gmemtest.avocado_files"


def _calls(path: str) -> list[tuple[str, ...]]:
    tree = ast.parse((avocado_files.ROOT / path).read_text())
    return [tuple(a.value for a in n.args[1:] if isinstance(a, ast.Constant))
            for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id.startswith("run_")]


def test_every_registry_row_is_one_test() -> None:
    guest = _calls("avocado_tests/guest/test_machine_checks.py")
    assert guest == [(s.name,) for s in SCENARIOS if s.source is Source.QMP and not s.private]
    profiles = _calls("avocado_tests/lab/test_lab_profiles.py")
    assert profiles == [(p.name,) for p in PROFILES.values() if p.accel == "kvm"]
    items = _calls("avocado_tests/labhost/test_labhost.py")
    assert items[1:] == [(c.name,) for c in HOST_CHECK_TABLE]
    chain = _calls("avocado_tests/labhost/test_chain.py")
    chain_rows = {s.name for s in SCENARIOS if s.source is Source.HOST or s.private}
    assert {scenario for scenario, _ in chain} == chain_rows and len(set(chain)) == len(chain)


def _tree(root: Path) -> Path:
    for make in avocado_files.FILES:
        f = make()
        target = root / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(avocado_files.render(f))
    return root / "avocado_tests/guest/test_machine_checks.py"


def test_a_new_row_makes_the_files_stale(tmp_path: Path) -> None:
    """The drift check can fail: a copy of the tree without one test is reported stale by path."""
    path = _tree(tmp_path)
    assert avocado_files.stale(tmp_path) == []
    path.write_text(path.read_text().replace('run_guest_scenario(self, "srao-free-page")', "pass"))
    assert avocado_files.stale(tmp_path) == ["avocado_tests/guest/test_machine_checks.py"]


def test_check_mode_names_the_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = _tree(tmp_path)
    monkeypatch.setattr(avocado_files, "ROOT", tmp_path)
    assert avocado_files.main(["--check"]) == 0
    path.unlink()
    assert avocado_files.main(["--check"]) == 1
    assert "avocado_tests/guest/test_machine_checks.py: stale; run python -m gmemtest.avocado_files" in \
        capsys.readouterr().err


def test_every_host_check_has_one_test_on_this_host_too() -> None:
    """avocado_tests/host/ is written by hand (its IDs are the README's); it must still hold one
    run_host_check per row of the table, no more, no less."""
    from gmemtest import host_checks

    named = []
    for path in sorted((avocado_files.ROOT / "avocado_tests" / "host").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "run_host_check":
                arg = node.args[1]
                assert isinstance(arg, ast.Name), ast.unparse(node)
                named.append(getattr(host_checks, arg.id))
    assert sorted(named) == sorted(c.name for c in HOST_CHECK_TABLE)
