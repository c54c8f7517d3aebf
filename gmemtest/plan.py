"""The main job's plan: for every Avocado test, whether this host can run it, and if not, the
host fact its CANCEL will name.

The plan is read from the tests themselves, not from a list kept beside them: each test module
under ``avocado_tests/`` is parsed (as Avocado's own loader does, without importing it), and
for every ``test*`` method the call that decides its fate is taken with its literal arguments:
``run_guest_scenario(self, "<scenario>")``, ``run_every_scenario_under(self, "<profile>")``,
``run_chain_item(self, "<row>", "<variant>")``, ``run_labhost_item(...)``,
``check_guest_boot(...)`` and ``run_host_check(self, <a row of gmemtest.host_checks>)`` (in the
method or in the class's ``setUp``), their arguments resolved from the module's imports.
The prediction then asks the same functions the test asks (``gmemtest.requirements``), so a
test cancels exactly when, and with the sentence, the plan says, on whatever host this is.

``tests/test_main_job.py`` holds the job to it: the CANCELled tests are exactly the planned
ones, each with the planned sentence in its reason, and every other test PASSes.
"""

from __future__ import annotations

import ast
import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmemtest.errors import GmemtestError
from gmemtest.requirements import (
    host_report,
    host_unmet,
    qemu_missing,
    qemu_report,
    scenario_unmet,
    unmet_requirements,
)
from gmemtest.scenarios import SCENARIOS, get_scenario, unsupported_under
from gmemtest.under_test import UnderTest
from guests.profiles import get_profile
from host_stack.capabilities import HostReport
from qmp_helpers import DEFAULT_QEMU

__all__ = ["AVOCADO_TESTS", "PlanError", "PlannedTest", "TestCall", "discover", "plan_main_job"]

AVOCADO_TESTS = Path(__file__).resolve().parent.parent / "avocado_tests"


class PlanError(GmemtestError, ValueError):
    """A test the plan cannot read (no deciding call it knows, an unresolvable argument)."""


@dataclass(frozen=True)
class TestCall:
    """One deciding call of a test, as written in its source."""

    function: str
    args: tuple[Any, ...]  # after ``self``
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class PlannedTest:
    """One Avocado test of the main job and its predicted fate."""

    test: str  # "Class.method", as in Avocado's test names after the path
    path: str  # relative to the repository
    calls: tuple[TestCall, ...] = field(default=())
    cancel: str | None = None  # the host fact its CANCEL names; None: it must run (and PASS)
    unknown: str | None = None  # why its fate cannot be predicted here (then ``cancel`` says nothing)

    def to_json(self) -> dict[str, Any]:
        return {"test": self.test, "path": self.path, "cancel": self.cancel, "unknown": self.unknown,
                "calls": [{"function": c.function, "args": [str(a) for a in c.args],
                           "kwargs": {k: str(v) for k, v in c.kwargs}} for c in self.calls]}


# --- reading the tests ---------------------------------------------------------------------------
def _imports(tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, attribute or None for a module) for every import of the file."""
    names: dict[str, tuple[str, str | None]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = (alias.name, None)
    return names


def _resolve(node: ast.expr, imports: dict[str, tuple[str, str | None]], where: str) -> Any:
    """A call argument's value: a literal, or a name (``X`` or ``mod.X``) the file imports."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name) and node.id in imports:
        module, attr = imports[node.id]
        if attr is None:
            return importlib.import_module(module)
        try:
            return getattr(importlib.import_module(module), attr)
        except AttributeError:
            return importlib.import_module(f"{module}.{attr}")
    if isinstance(node, ast.Attribute):
        return getattr(_resolve(node.value, imports, where), node.attr)
    if isinstance(node, ast.Subscript):
        return _resolve(node.value, imports, where)[_resolve(node.slice, imports, where)]
    raise PlanError(f"{where}: cannot resolve the argument {ast.unparse(node)!r} of a deciding call")


def _calls(body: Sequence[ast.stmt], imports: dict[str, tuple[str, str | None]], where: str) -> list[TestCall]:
    found: list[TestCall] = []
    for node in ast.walk(ast.Module(body=list(body), type_ignores=[])):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _PREDICT:
            args = tuple(_resolve(a, imports, where) for a in node.args[1:])
            kwargs = tuple((str(k.arg), _resolve(k.value, imports, where)) for k in node.keywords)
            found.append(TestCall(node.func.id, args, kwargs))
    return found


def discover(root: Path = AVOCADO_TESTS) -> list[tuple[str, str, tuple[TestCall, ...]]]:
    """(``Class.method``, path, deciding calls) for every test method under ``root``, in file order."""
    tests: list[tuple[str, str, tuple[TestCall, ...]]] = []
    for path in sorted(root.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        imports = _imports(tree)
        rel = str(path.relative_to(root.parent))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            methods = [n for n in cls.body if isinstance(n, ast.FunctionDef)]
            setup = [c for m in methods if m.name == "setUp" for c in _calls(m.body, imports, rel)]
            for method in (m for m in methods if m.name.startswith("test")):
                name = f"{cls.name}.{method.name}"
                tests.append((name, rel, (*setup, *_calls(method.body, imports, f"{rel}:{name}"))))
    return tests


# --- predicting ----------------------------------------------------------------------------------
@dataclass
class _Context:
    report: HostReport | None
    qemu: str
    newer_qemu: Callable[[], str | None]
    built_qemu: Callable[[], str | None] = lambda: None

    def host(self) -> HostReport:
        return self.report if self.report is not None else host_report()

    @functools.cached_property
    def served_from_decoy(self) -> bool:
        """Whether this host serves gmem slots from userspace_addr (asked once, with a tiny VM);
        a stand-in report says nothing about this host's memory."""
        from host_stack import vmm
        from host_stack.kvm import KvmSystem

        if self.report is not None:
            return False
        with KvmSystem() as system:
            return any(f.id == vmm.FINDING_ID for f in vmm.run_backing_source(system).findings)


def _guest_scenario(ctx: _Context, name: str) -> str | None:
    spec = get_scenario(name)
    profile = UnderTest(qemu=ctx.qemu).profile_for(spec)
    unmet = scenario_unmet(spec, profile, binary=ctx.qemu)
    return "; ".join(unmet) or None


def _profile(ctx: _Context, name: str) -> str | None:
    """What ``run_every_scenario_under`` meets first: the first scenario the profile runs."""
    chosen = UnderTest(qemu=ctx.qemu, profile=name)
    for spec in SCENARIOS:
        profile = chosen.profile_for(spec)
        left_out = unsupported_under(spec, profile) is not None or any(
            ctx.host().missing(r) is not None for r in spec.requirements)
        if not left_out:
            return "; ".join(scenario_unmet(spec, profile, binary=ctx.qemu)) or None
    return None


def _guest_boot(ctx: _Context, **_kwargs: object) -> str | None:
    profile = get_profile("tcg-default")
    return "; ".join(unmet_requirements(profile.requirements, accel=profile.accel, binary=ctx.qemu)) or None


def _chain(ctx: _Context, scenario: str, variant: str) -> str | None:
    """A chain row runs in L1, which has KVM and memory failure; only its QEMU can lack something,
    and what QOM says of a binary does not depend on the host that asks (L1 runs the same files)."""
    from gmemtest.lab.qualify import GMEM_VARIANT, SWPROT_VARIANT, chain_variants

    newer = ctx.newer_qemu()
    # only kvm-gmem and kvm-swprot need the project's QEMU
    built = ctx.built_qemu() if variant in (GMEM_VARIANT, SWPROT_VARIANT) else None
    chosen = {v.label: v for v in chain_variants(Path(newer) if newer else None,
                                                 Path(built) if built else None)}.get(variant)
    if chosen is None:
        raise PlanError(f"chain variant {variant!r} of {scenario} is not one of chain_variants()")
    binary = str(chosen.qemu) if chosen.qemu is not None else ctx.qemu
    wanted = [r for r in get_profile(chosen.profile).requirements if r.startswith("qemu:") and r != "qemu:kvm-start"]
    caps = qemu_report(binary)
    if isinstance(caps, str):
        return caps
    unmet = [m for r in wanted if (m := qemu_missing(r.removeprefix("qemu:"), caps)) is not None]
    return "; ".join(unmet) or None


def _host_check(ctx: _Context, name: str) -> str | None:
    """A row of the host-check table: its requirements, then (for the oracle checks) whether
    this host's gmem slots are served from userspace_addr, where they are NOT MEANINGFUL."""
    from gmemtest.host_checks import NOT_MEANINGFUL_ON_DECOY, host_check
    from host_stack import vmm

    try:
        check = host_check(name)
    except KeyError as exc:
        raise PlanError(str(exc)) from exc
    unmet = host_unmet(check.requirements, ctx.report)
    if unmet is None and name in NOT_MEANINGFUL_ON_DECOY and ctx.served_from_decoy:
        return vmm.NOT_MEANINGFUL_ON_DECOY
    return unmet


_PREDICT: dict[str, Callable[..., str | None]] = {
    "run_guest_scenario": _guest_scenario,
    "run_every_scenario_under": _profile,
    "check_guest_boot": _guest_boot,
    "run_chain_item": _chain,
    "run_labhost_item": lambda ctx, *_args: None,  # L1 is the host it is built to be (its preflight test)
    "run_host_check": _host_check,
}


def _lazy_binary(given: str | None, build: Callable[[], Path], unavailable: str) -> Callable[[], str | None]:
    """``given``, else the binary ``build`` makes (cached; asked once, and only when a test needs it);
    a build that fails is a ``PlanError`` of that test, ``unavailable`` saying why it was wanted."""

    @functools.cache
    def binary() -> str | None:
        if given is not None:
            return given
        from images.build import BuildError
        from images.debs import PackageError

        try:
            return str(build())
        except (BuildError, PackageError) as exc:
            raise PlanError(f"{unavailable}: {exc}") from exc

    return binary


def plan_main_job(root: Path = AVOCADO_TESTS, *, report: HostReport | None = None, qemu: str = DEFAULT_QEMU,
                  newer_qemu: str | None = None, built_qemu: str | None = None) -> list[PlannedTest]:
    """Every test under ``root`` with its predicted CANCEL (None: it runs here).

    ``report`` stands in for this host's probed report (a report that says a capability is 0
    plans a host without it); ``newer_qemu`` is the chain's Debian-newest QEMU (default: the
    cached root of ``images.qemu_root``, built if it is not there yet), ``built_qemu`` the
    project's own (default: ``images.qemu_build``'s, built if it is not there yet).
    """

    def newer_root() -> Path:
        from images.qemu_root import build_qemu_root

        return build_qemu_root().binary

    def project_build() -> Path:
        from images.qemu_build import build_qemu

        return build_qemu().binary

    newer = _lazy_binary(newer_qemu, newer_root, "the chain rows run under Debian's newest QEMU, which could not "
                         "be had to ask (python -m images qemu)")
    built = _lazy_binary(built_qemu, project_build, "kvm-gmem's and kvm-swprot's chain rows run under the project's "
                         "QEMU, which could not be had to ask (python -m images qemu-build)")
    ctx = _Context(report, qemu, newer, built)
    planned: list[PlannedTest] = []
    for name, path, calls in discover(root):
        try:
            cancel = _predict(ctx, name, path, calls)
        except PlanError as exc:  # this test only: the others are still planned
            planned.append(PlannedTest(name, path, calls, None, str(exc)))
            continue
        planned.append(PlannedTest(name, path, calls, cancel))
    return planned


def _predict(ctx: _Context, name: str, path: str, calls: tuple[TestCall, ...]) -> str | None:
    if not calls:
        raise PlanError(f"{path}:{name} makes none of the calls the plan reads ({', '.join(_PREDICT)})")
    for call in calls:
        cancel = _PREDICT[call.function](ctx, *call.args, **dict(call.kwargs))
        if cancel is not None:
            return cancel
    return None
