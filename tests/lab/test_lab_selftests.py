"""The upstream kernel's own LUO selftests (tools/testing/selftests/liveupdate),
built by `luvmm lab build` from the lab kernel's tree, pass in the lab: the lab
itself is right.  The kexec tests run with their stage protocol across one real
kexec.  Guest side: tests/lab/guest_selftests.py."""

import re

import pytest

from luvmm.lab.build import KEXEC_SELFTESTS


@pytest.fixture(scope="module")
def stages(lab_selftests):
    return lab_selftests.json("selftests-1.json"), lab_selftests.json("selftests-2.json")


def test_one_kexec_two_stages(lab_selftests, lab_kernel, stages):
    result = lab_selftests.result
    assert [b["stage"] for b in result.boots] == [1, 2] and len(result.kexecs) == 1
    assert stages[0]["release"] == stages[1]["release"] == lab_kernel["kernelrelease"]
    assert result.status == 0


def test_liveupdate_device_tests_pass(stages):
    run = stages[0]["liveupdate"]
    assert run["exit"] == 0, run["output"]
    totals = re.search(r"# Totals: pass:(\d+) fail:(\d+) xfail:(\d+) xpass:(\d+) skip:(\d+) error:(\d+)",
                       run["output"])
    assert totals, run["output"]
    passed, failed, _, _, skipped, errors = map(int, totals.groups())
    assert passed >= 15 and failed == skipped == errors == 0, run["output"]


@pytest.mark.parametrize("name", KEXEC_SELFTESTS)
def test_kexec_selftest_passes_both_stages(stages, name):
    first, second = stages[0][name], stages[1][name]
    assert first["exit"] == 0, first["output"]
    assert "[STAGE 1]" in first["output"]
    assert second["exit"] == 0, second["output"]
    assert "[STAGE 2]" in second["output"] and "Stage mismatch" not in second["output"]
    assert "TEST PASSED" in second["output"], second["output"]
