"""The state dir: the emulated host's "disk".

Layout: ``host.sock`` (the daemon's control socket, mode 0600), ``agent.sock``,
``host.pid``, ``host.log``, ``units/NAME.json`` (what init starts), ``logs/``
(each unit's output), ``vms/NAME/`` (per-VM files of the VMM).  The directory
itself is 0700: only its owner reaches the host.
"""

from __future__ import annotations

import os


def python_unit(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment for a unit that runs ``module.main(args)``.

    Units run with ``-S`` (no site initialisation: about 60 ms less before a
    restored VMM runs its guest again) and get this interpreter's import path
    appended after the standard library's (PYTHONPATH would put it first and
    make every standard-library import search it).
    """
    import site
    import sys

    paths = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    paths += [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    # Not runpy: calling main() directly spares its imports on the restore path.
    boot = (f"import sys; sys.path += {paths!r}; sys.argv[0] = {module!r}; "
            f"from {module} import main; sys.exit(main({list(args)!r}))")
    return [sys.executable, "-S", "-c", boot], {}


UNIT_USAGE = "usage: ... --state-dir DIR [--name NAME] [--host emulated|real]"


def parse_unit_args(argv: list[str], *, name_required: bool = True) -> dict[str, str]:
    """The few flags of the agent and the VMM, without argparse (20 ms on the restore path)."""
    args = {"host": "emulated"}
    it = iter(argv)
    for flag in it:
        key = {"--state-dir": "state_dir", "--name": "name", "--host": "host"}.get(flag)
        value = next(it, None)
        if key is None or value is None:
            raise SystemExit(UNIT_USAGE)
        args[key] = value
    if "state_dir" not in args or (name_required and "name" not in args) or \
            args["host"] not in ("emulated", "real"):
        raise SystemExit(UNIT_USAGE)
    return args


def default_state_dir() -> str:
    """$LUVMM_STATE_DIR, else $XDG_RUNTIME_DIR/luvmm, else /tmp/luvmm-UID."""
    if os.environ.get("LUVMM_STATE_DIR"):
        return os.environ["LUVMM_STATE_DIR"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "luvmm")
    return f"/tmp/luvmm-{os.getuid()}"


class StateDir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    @property
    def socket(self) -> str:
        return os.path.join(self.path, "host.sock")

    @property
    def agent_socket(self) -> str:
        return os.path.join(self.path, "agent.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.path, "host.pid")

    @property
    def log(self) -> str:
        return os.path.join(self.path, "host.log")

    # pathlib only where it is used: the restore path must not import it.
    @property
    def units(self):
        from pathlib import Path

        return Path(self.path) / "units"

    @property
    def logs(self):
        from pathlib import Path

        return Path(self.path) / "logs"

    def vm_dir(self, name: str):
        from pathlib import Path

        return Path(self.path) / "vms" / name

    def ensure(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        self.units.mkdir(exist_ok=True)
        self.logs.mkdir(exist_ok=True)

    def write_pid(self, pid: int) -> None:
        with open(self.pidfile, "w") as f:
            f.write(f"{pid}\n")

    def clear_pid(self) -> None:
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass

    def pid(self) -> int | None:
        try:
            with open(self.pidfile) as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            return None

    # --- units ----------------------------------------------------------------------------

    def write_unit(self, name: str, argv: list[str], env: dict[str, str] | None = None, **extra):
        self.ensure()
        path = self.units / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        import json

        tmp.write_text(json.dumps({"name": name, "argv": argv, "env": env or {}, **extra}, indent=2))
        os.replace(tmp, path)
        return path

    def remove_unit(self, name: str) -> bool:
        try:
            (self.units / f"{name}.json").unlink()
            return True
        except FileNotFoundError:
            return False

    def read_units(self) -> list[dict]:
        import json

        units = []
        for path in sorted(self.units.glob("*.json")):
            try:
                unit = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(unit, dict) and isinstance(unit.get("argv"), list) and unit.get("name") == path.stem:
                units.append(unit)
        return units
