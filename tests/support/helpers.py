"""Small helpers shared by the tests."""

import pytest


def errno_of(fn, *args, **kw) -> int:
    """The errno of the OSError that ``fn(*args, **kw)`` must raise."""
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    return e.value.errno


def units(host):
    """The emulated host's init, as the product takes it (luvmm.services.Units)."""
    from luvmm.liveupdate.emu.services import EmulatedUnits

    return EmulatedUnits(host)
