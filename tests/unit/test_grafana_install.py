"""`luvmm host install` where Grafana is installed: its dashboard provider
points at the installed luvmm's dashboard (issue 24's friction: the shipped
provider named /usr/share/luvmm/grafana, which nothing installs)."""

import os
import re

from tests.unit.test_systemd import cli


def test_install_writes_grafanas_dashboard_provider_where_grafana_is(tmp_path):
    provisioning = tmp_path / "etc/grafana/provisioning/dashboards"
    provisioning.mkdir(parents=True)
    done = cli("host", "install", "--root", str(tmp_path))
    written = provisioning / "luvmm.yaml"
    assert f"wrote {written} (Grafana's luvmm dashboard)" in done.stdout
    [path] = re.findall(r"^\s+path: (\S+)$", written.read_text(), re.M)
    assert os.path.isfile(os.path.join(path, "luvmm.json"))
    assert os.listdir(provisioning) == ["luvmm.yaml"]  # no temp file left


def test_install_without_grafana_writes_no_provider(tmp_path):
    done = cli("host", "install", "--root", str(tmp_path))
    assert "Grafana" not in done.stdout and not (tmp_path / "etc/grafana").exists()
