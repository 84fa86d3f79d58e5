"""JobSpec.parse: what a submission may say and how it is stored (no Redis needed)."""

from __future__ import annotations

import pytest

from appliance.errors import ValidationError
from appliance.jobs import JobSpec


@pytest.mark.parametrize("name", ["workflow_priority", "workflow_datetime", "step_number"])
def test_workflow_numbers_take_digit_strings(name: str) -> None:
    as_text = JobSpec.parse({"service_required": "simulation", name: "7"})
    as_number = JobSpec.parse({"service_required": "simulation", name: 7})
    assert as_text.workflow == as_number.workflow == {name: "7"}


@pytest.mark.parametrize("name", ["workflow_priority", "workflow_datetime", "step_number"])
@pytest.mark.parametrize("value", ["7a", "-1", "²", 1.5, True, [7]])
def test_workflow_numbers_refuse_other_values(name: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.parse({"service_required": "simulation", name: value})
    assert caught.value.field == name


def test_blank_workflow_priority_is_unset() -> None:
    for blank in (0, "0", "", None):
        assert JobSpec.parse({"service_required": "simulation", "workflow_priority": blank}).workflow == {}
