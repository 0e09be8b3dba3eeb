"""A short `luvmm update --timeout` (issue 24, item 7): it bounds each step
before the kexec; an update that went through is never reported failed
because its outcome took longer than that to come."""

import json

from luvmm import exitcodes


def test_an_update_with_a_tiny_step_timeout_reports_its_outcome(cli):
    cli("vm", "start", "a", "--guest", "synthetic", "--memory", "64M")
    proc = cli("update", "--timeout", "0.05", "--json", status=None)
    last = json.loads(cli("update", "--last", "--json").stdout)
    if proc.returncode == exitcodes.OK:  # it went through: its report, as `update --last` has it
        assert json.loads(proc.stdout)["cycles"][0]["vm"] == "a" and not last["cycles"][0].get("error")
    else:  # refused before the kexec (its VMM not ready within 0.05 s): nothing happened, and it says so
        assert "nothing paused" in cli.error_line(proc) or "not registered" in cli.error_line(proc), proc.stderr
    cli("vm", "stop", "a")
    cli("host", "stop")
