"""luvmm: a userspace VMM that survives a host live update.

One import name: everything is ``luvmm.``.  The repository keeps the
components in folders at its top (``vmm/``, ``devices/``, ``liveupdate/``,
``metrics/``); the distribution installs them as ``luvmm.vmm``,
``luvmm.devices``, ``luvmm.liveupdate`` and ``luvmm.metrics`` (setup.py's
package_dir), and from a checkout this package finds them beside it (its
``__path__`` below), so that no generic name (``vmm``, ``metrics``) is ever
imported at the top level, where another distribution could own it.

The layers, bottom to top.  An import goes down, or stays in its layer;
tests/unit/test_architecture.py checks it (LAYERS), and lists the few that
still go up (GOING_UP: the /metrics servers of the daemon and of the VMM's
control plane, the VMM's unit main wiring its host), to be taken out:

1. the kernel ABI and the host interface: :mod:`luvmm.abi`, :mod:`luvmm.uapi`,
   :mod:`luvmm.host`, and the wire formats and names every process shares;
2. inter-process calls: :mod:`luvmm.rpc`, :mod:`luvmm.peer`, :mod:`luvmm.services`;
3. the components: the devices' handles (:mod:`luvmm.devices`), the host-side
   services -- the LUO agent, init, the state dir (:mod:`luvmm.liveupdate`) --
   and the VMM (:mod:`luvmm.vmm`); the emulated host in ``*.emu``;
4. metrics and presentation (:mod:`luvmm.metrics`);
5. the command line, the tools, the lab and the wiring of hosts
   (:mod:`luvmm.cli`, :mod:`luvmm.tools`, :mod:`luvmm.lab`, :mod:`luvmm.wiring`).
"""

import os as _os

__version__ = "0.1.0"

# From a checkout (or an editable install, whose import hook a unit started
# with ``python -S`` does not load), the component folders are the
# repository's own, beside this package.  An installed distribution has them
# inside it, and this adds nothing.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "vmm", "__init__.py")) and \
        _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")):
    __path__.append(_checkout)
del _checkout
