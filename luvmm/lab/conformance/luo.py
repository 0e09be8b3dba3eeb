"""LUO: /dev/liveupdate and its sessions (kernel/liveupdate/luo_core.c,
luo_session.c, luo_file.c), without a kexec."""

from __future__ import annotations

from liveupdate.luo import LiveUpdate
from luvmm.lab.conformance import case, errno_of


def _luo(ctx) -> LiveUpdate:
    luo = LiveUpdate.open(ctx.host)
    ctx.track(luo.fd)
    return luo


def _session(ctx, luo: LiveUpdate, name):
    s = luo.create_session(name)
    ctx.track(s.fd)
    return s


@case("luo")
def case_second_open_of_dev_liveupdate(ctx):
    """luo_core.c luo_open: one opener at a time (-EBUSY)."""
    _luo(ctx)
    return errno_of(lambda: ctx.track(LiveUpdate.open(ctx.host).fd))


@case("luo")
def case_create_a_session_twice(ctx):
    """luo_session.c luo_session_insert: a name already outgoing is -EEXIST."""
    luo = _luo(ctx)
    _session(ctx, luo, "conformance-dup")
    return errno_of(_session, ctx, luo, "conformance-dup")


@case("luo")
def case_session_get_name(ctx):
    """LIVEUPDATE_SESSION_GET_NAME gives back the name given at CREATE."""
    luo = _luo(ctx)
    return _session(ctx, luo, "conformance-name").get_name()
