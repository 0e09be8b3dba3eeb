"""The emulated kernel's LUO rules hold on the real one: the tests of
tests/emulated/test_luo_selftests.py that need no kexec, run unchanged in the lab
against the lab kernel through RealHost (guest side:
tests/lab/guest_luo_rules.py, in the lab_devices boot)."""

import pytest

from tests.lab.guest_luo_rules import without_kexec


@pytest.fixture(scope="module")
def rules(lab_devices):
    return lab_devices.json("luo_rules.json")


@pytest.mark.parametrize("name", without_kexec())
def test_the_emulated_rule_holds_on_the_lab_kernel(rules, name):
    assert rules.get(name) == "passed", rules.get(name)
