"""The LUO and memfd conformance cases (luvmm/lab/conformance/{luo,memfd}.py)
on the emulated host and on the lab kernel: every case runs on both sides,
and none differs except where declared (out of tree, or not modelled)."""

import json
import os
import subprocess
import sys

from luvmm.lab import ROOT


def test_luo_and_memfd_agree_with_the_lab_kernel(lab_kernel):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "luvmm", "lab", "conformance", "--area", "luo", "--area", "memfd",
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), f"no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    broken = {r["case"]: (r["emulated"], r["real"]) for r in report["cases"]
              if "result" not in r["emulated"] or "result" not in r["real"]}
    assert not broken, f"cases that did not run on both sides: {json.dumps(broken)[:3000]}"
    assert report["summary"]["differ"] == [], json.dumps(
        [r for r in report["cases"] if r["case"] in report["summary"]["differ"]])[:3000]
    assert report["summary"]["cases"] >= 20
