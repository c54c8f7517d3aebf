"""The acts table: every row of the scenario table has its act, and every trigger its expectation half."""

from __future__ import annotations

import dataclasses

import pytest

from gmemtest.acts import ACTS, WHERE_FATAL, act_for, act_name
from gmemtest.errors import ScenarioError
from gmemtest.oracle import INTEL, SIGBUS_OF_TRIGGER, MappingLayout, PageLayout, expect
from gmemtest.scenarios import HOST_TRIGGERS, SCENARIOS, ScenarioSpec, Source, Trigger, get_scenario


def _layout(spec_size: int = 4 << 12) -> MappingLayout:
    pages = tuple(PageLayout(0x7F0000000000 + (i << 12), 0x1000 + i) for i in range(spec_size >> 12))
    return MappingLayout(kind="anon4k", base_va=0x7F0000000000, size=spec_size, page_size=4096, pages=pages,
                         is_thp=False)


def test_every_trigger_has_its_expectation_half() -> None:
    assert set(SIGBUS_OF_TRIGGER) == set(Trigger)


def test_the_acts_are_the_combinations_a_row_may_name() -> None:
    allowed = {(Source.QMP, t) for t in Trigger} | {(Source.HOST, t) for t in HOST_TRIGGERS}
    assert set(ACTS) == allowed, f"acts {sorted((s.value, t.value) for s, t in ACTS)} != rows' {sorted(allowed)}"


@pytest.mark.parametrize("spec", [s for s in SCENARIOS if s.source is not Source.CONVERSION], ids=lambda s: s.name)
def test_every_scenario_row_has_an_act(spec: ScenarioSpec) -> None:
    act = ACTS[(spec.source, spec.trigger)]
    assert (act.source, act.trigger) == (spec.source, spec.trigger)


def test_a_conversion_row_injects_nothing_and_has_no_act() -> None:
    """gmemtest.conversion_row runs it whole; an act would mean something is injected."""
    rows = [s for s in SCENARIOS if s.source is Source.CONVERSION]
    assert rows and all(s.private and not s.mce_kind for s in rows)
    assert not any(source is Source.CONVERSION for source, _ in ACTS)


def test_a_row_the_oracle_grades_fatal_gets_the_where_fatal_act() -> None:
    spec = get_scenario("srao-late-touch-4k")
    kw = {"vcpus": 1, "mce_status": 0xBD00000000000134, "mce_misc": 0x8C, "mce_bank": 9}
    intel = expect(spec, _layout(), vendor=INTEL, **kw)
    amd = expect(spec, _layout(), vendor="AuthenticAMD", **kw)
    assert act_name(act_for(spec, intel)) == "qmp_touch"
    assert amd.panic and act_for(spec, amd) is WHERE_FATAL


def test_a_combination_without_an_act_is_refused_by_name() -> None:
    odd = dataclasses.replace(get_scenario("srao-late-touch-4k"), name="odd")
    exp = expect(odd, _layout(), vendor=INTEL, vcpus=1, mce_status=0, mce_misc=0, mce_bank=9)
    object.__setattr__(odd, "source", Source.HOST)
    object.__setattr__(odd, "trigger", Trigger.SPIN)
    with pytest.raises(ScenarioError, match=r"odd: no act for source 'host' with trigger 'spin'; the acts are .*"):
        act_for(odd, exp)


def test_a_host_row_with_a_trigger_that_has_no_act_is_refused_at_definition() -> None:
    with pytest.raises(ValueError, match="needs trigger touch or wait, got spin"):
        dataclasses.replace(get_scenario("host-ao-early-kill-4k"), trigger=Trigger.SPIN)
