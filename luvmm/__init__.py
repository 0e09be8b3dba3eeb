"""luvmm: a userspace VMM that survives a host live update.

The top-level package holds what every component shares: the kernel ABI
machinery (:mod:`luvmm.abi`), the host interface -- the one code path above
the syscall line (:mod:`luvmm.host`) -- and the command line (:mod:`luvmm.cli`).
The components themselves live in the sibling packages ``vmm``, ``devices``,
``liveupdate`` and ``metrics``.
"""

__version__ = "0.1.0"
