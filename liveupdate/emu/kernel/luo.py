"""The Live Update Orchestrator, as kernel/liveupdate/luo_{core,session,file}.c
behave, errno for errno.

/dev/liveupdate has one opener at a time (EBUSY).  CREATE_SESSION makes an
*outgoing* session (name 1..63 bytes, else EINVAL; a duplicate name EEXIST);
RETRIEVE_SESSION opens an *incoming* one, handed over by the previous kernel
(unknown ENOENT, retrieved twice EINVAL).  On a session fd: PRESERVE_FD only
on outgoing sessions, RETRIEVE_FD and FINISH only on incoming ones (EINVAL
otherwise); a token used twice in a session is EEXIST, a file preserved twice
anywhere EBUSY, a file no handler takes ENOENT, an unknown token ENOENT.
Struct sizes follow copy_struct_from_user: short EINVAL, non-zero bytes past
the known struct E2BIG.  FINISH asks every file's can_finish first (EBUSY).
Closing an outgoing session fd unpreserves its files; closing a retrieved
one finishes it.  Freeze runs inside the kexec reboot: a failing freeze
unfreezes the others and the reboot returns the error.

Why this long: it mirrors one kernel subsystem, LUO (luo_core.c,
luo_session.c, luo_file.c), rule for rule and errno for errno; the kernel's
own files are longer.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from luvmm.abi import _IOC_NR, ffi
from luvmm.liveupdate.emu.kernel.core import File, KernelError, KernelPanic, RealFile, copy_struct, register_subsystem, respond
from luvmm.uapi.luo import (
    LIVEUPDATE_CMD_SESSION_BASE,
    LIVEUPDATE_IOCTL_CREATE_SESSION,
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
    LIVEUPDATE_SESSION_FINISH,
    LIVEUPDATE_SESSION_GET_NAME,
    LIVEUPDATE_SESSION_NAME_LENGTH,
    LIVEUPDATE_SESSION_PRESERVE_FD,
    LIVEUPDATE_SESSION_RETRIEVE_FD,
)

log = logging.getLogger(__name__)

#: The emulated LUO tree's ABI, in the role of LUO_ABI_COMPATIBLE
#: (include/linux/kho/abi/luo.h): a kernel given another panics
#: (luo_early_startup -> luo_restore_fail).
LUO_COMPATIBLE = "luvmm,luo-v1"


def _incompatible(detail: str = "") -> KernelPanic:
    """luo_early_startup failing: liveupdate_early_init's luo_restore_fail() is panic()."""
    return KernelPanic(f"LUO state is incompatible with '{LUO_COMPATIBLE}'{detail}; The incoming tree failed "
                       "to initialize properly [-EINVAL], disabling live update")


class FileHandler:
    """A LUO file handler (struct liveupdate_file_handler)."""

    compatible = ""

    def __init__(self, kernel):
        self.kernel = kernel

    def can_preserve(self, target) -> bool:
        return False

    def preserve(self, lf: LuoFile) -> dict:
        return {}

    def unpreserve(self, lf: LuoFile) -> None:
        pass

    def freeze(self, lf: LuoFile) -> dict:
        return lf.state

    def unfreeze(self, lf: LuoFile) -> None:
        pass

    def hardware(self, state: dict) -> tuple[set[str], set[int], set[tuple[int, int]]]:
        """(PCI functions, IOMMU domains, memory) the preserved state needs."""
        return set(), set(), set()

    def restore(self, lf: LuoFile) -> None:
        """At boot, for each incoming file (claim its hardware)."""

    def retrieve(self, lf: LuoFile):
        """Returns a new File (emulated) or an fd (real) for the caller."""
        raise KernelError(errno.ENOENT)

    def can_finish(self, lf: LuoFile) -> bool:
        return True

    def finish(self, lf: LuoFile) -> None:
        pass


@dataclass
class LuoFile:
    token: int
    handler: FileHandler
    target: object = None  # File or RealFile (outgoing); retrieved object (incoming)
    ref_fd: int = -1  # LUO's reference on an emulated file: a dup of its client end
    state: dict = field(default_factory=dict)
    frozen: bool = False
    retrieve_status: int = 0  # 0 not yet, 1 retrieved, <0 failed with -errno
    identity: object = None

    def drop_ref(self) -> None:
        if self.ref_fd >= 0:
            os.close(self.ref_fd)
            self.ref_fd = -1
        if isinstance(self.target, RealFile):
            self.target.close()


@dataclass
class Session:
    name: str
    incoming: bool
    files: list[LuoFile] = field(default_factory=list)
    retrieved: bool = False
    file: File | None = None

    def find(self, token: int) -> LuoFile | None:
        return next((f for f in self.files if f.token == token), None)


def _name_of(cmd, *, create: bool) -> str:
    """The name in a CREATE/RETRIEVE_SESSION struct.

    luo_session_create: ``strnlen(name, 64)`` of 0 or 64 (no NUL) is EINVAL,
    and any other bytes are a name (no encoding rule).  luo_session_retrieve
    does no length check at all: it strncmp()s the 64 bytes against each
    incoming name, so an empty or unterminated name just matches none
    (ENOENT).  Names are kept as str with surrogateescape, so that every byte
    string round-trips (GET_NAME gives back the same bytes).
    """
    raw = bytes(cmd.name)
    end = raw.find(b"\0")
    if create and end <= 0:  # empty, or 64 bytes with no terminator
        raise KernelError(errno.EINVAL, "session names are 1 to 63 bytes")
    return raw[:end if end >= 0 else len(raw)].decode("utf-8", "surrogateescape")


def name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _check_cmd(request: int, expected: dict[int, int], base: int) -> int:
    """luo_ioctl's dispatch: nr out of the table EINVAL, wrong encoding ENOTTY."""
    nr = _IOC_NR(request)
    if nr - base not in range(len(expected)) or nr < base:
        raise KernelError(errno.EINVAL)
    if expected[nr - base] != request:
        raise KernelError(errno.ENOTTY)
    return request


class LiveUpdateDev(File):
    kind = "liveupdate"

    def ioctl(self, request, definition, buf, fds, arg):
        luo = self.kernel.luo
        _check_cmd(request, {0: LIVEUPDATE_IOCTL_CREATE_SESSION, 1: LIVEUPDATE_IOCTL_RETRIEVE_SESSION}, 0)
        argtype = definition.argtype
        cmd, size = copy_struct(buf, argtype, "name")
        create = request == LIVEUPDATE_IOCTL_CREATE_SESSION
        name = _name_of(cmd, create=create)
        session = luo.create(name) if create else luo.retrieve(name)
        session.file = SessionFile(self.kernel, session)
        fd = self.kernel.install(session.file)
        cmd.fd = -1  # the client writes its own number in
        respond(buf, cmd, size)
        return 0, [fd]

    def release(self):
        self.kernel.luo.dev_open = None


class SessionFile(File):
    kind = "luo-session"

    def __init__(self, kernel, session: Session):
        super().__init__(kernel)
        self.session = session

    def describe(self):
        return f"luo-session:{self.session.name}"

    def ioctl(self, request, definition, buf, fds, arg):
        luo = self.kernel.luo
        session = self.session
        _check_cmd(request, {0: LIVEUPDATE_SESSION_PRESERVE_FD, 1: LIVEUPDATE_SESSION_RETRIEVE_FD,
                             2: LIVEUPDATE_SESSION_FINISH, 3: LIVEUPDATE_SESSION_GET_NAME},
                   LIVEUPDATE_CMD_SESSION_BASE)
        if request == LIVEUPDATE_SESSION_PRESERVE_FD:
            if session.incoming:
                raise KernelError(errno.EINVAL, "PRESERVE_FD on a retrieved session")
            cmd, size = copy_struct(buf, definition.argtype, "token")
            # luo_preserve_file: the token is checked before fget (EEXIST before EBADF).
            luo.preserve(session, cmd.token, fds[0] if cmd.fd >= 0 and fds else None)
            respond(buf, cmd, size)
            return 0
        if request == LIVEUPDATE_SESSION_RETRIEVE_FD:
            if not session.incoming:
                raise KernelError(errno.EINVAL, "RETRIEVE_FD on an outgoing session")
            cmd, size = copy_struct(buf, definition.argtype, "token")
            fd = luo.retrieve_fd(session, cmd.token)
            cmd.fd = -1
            respond(buf, cmd, size)
            return 0, [fd]
        if request == LIVEUPDATE_SESSION_FINISH:
            if not session.incoming:
                raise KernelError(errno.EINVAL, "FINISH on an outgoing session")
            cmd, size = copy_struct(buf, definition.argtype, "reserved")
            if cmd.reserved:
                raise KernelError(errno.EINVAL)
            luo.finish(session)
            respond(buf, cmd, size)
            return 0
        cmd, size = copy_struct(buf, definition.argtype, "name")
        if cmd.reserved:
            raise KernelError(errno.EINVAL)
        raw = name_bytes(session.name)[:LIVEUPDATE_SESSION_NAME_LENGTH - 1]
        ffi.memmove(cmd.name, raw + b"\0", len(raw) + 1)
        respond(buf, cmd, size)
        return 0

    def release(self):
        self.kernel.luo.session_closed(self.session)


#: The LUO file handlers, as liveupdate_register_file_handler() keeps them:
#: each file type's module registers its own (memfd, vfio, iommufd).
FILE_HANDLERS: list[type] = []


def register_file_handler(cls: type) -> None:
    if cls not in FILE_HANDLERS:
        FILE_HANDLERS.append(cls)


class LuoSubsystem:
    def __init__(self, kernel):
        self.kernel = kernel
        self.dev_open: File | None = None
        self.outgoing: dict[str, Session] = {}
        self.incoming: dict[str, Session] = {}
        self.preserved: dict[object, LuoFile] = {}
        # Each handler takes one file type (can_preserve): their order does not matter.
        self.handlers = [cls(kernel) for cls in FILE_HANDLERS]
        #: Why the incoming sessions could not be deserialized (luo_session_deserialize
        #: failed): every open of /dev/liveupdate is EIO for this boot (luo_open).
        self.restore_error: str | None = None

    def open_node(self, path: str) -> File | None:
        if path != "/dev/liveupdate":
            return None
        if self.kernel.alive(self.dev_open):
            raise KernelError(errno.EBUSY, "/dev/liveupdate is already open")
        if self.restore_error is not None:  # luo_open: "Always return -EIO to user if deserialization fail"
            raise KernelError(errno.EIO, f"live update deserialization failed: {self.restore_error}")
        self.dev_open = LiveUpdateDev(self.kernel)
        return self.dev_open

    # --- sessions ---------------------------------------------------------------------------

    def create(self, name: str) -> Session:
        # A session whose fd the client closed is released by luo_session_release
        # before close() returns: ask whether it is still alive (the daemon sees
        # the close asynchronously), so that close-then-CREATE is never EEXIST.
        existing = self.outgoing.get(name)
        if existing is not None:
            self.kernel.alive(existing.file)
        if name in self.outgoing:
            raise KernelError(errno.EEXIST, f"session {name!r} exists")
        session = self.outgoing[name] = Session(name, incoming=False)
        return session

    def retrieve(self, name: str) -> Session:
        session = self.incoming.get(name)
        if session is not None and session.file is not None:
            self.kernel.alive(session.file)  # closed meanwhile: released (and removed) first
            session = self.incoming.get(name)
        if session is None:
            raise KernelError(errno.ENOENT, f"no incoming session {name!r}")
        if session.retrieved:
            raise KernelError(errno.EINVAL, f"session {name!r} was already retrieved")
        session.retrieved = True
        return session

    def memory(self) -> set[tuple[int, int]]:
        """The machine memory the sessions keep: what their files preserve,
        outgoing, or hand over until they are finished, incoming."""
        keys = set()
        for session in (*self.outgoing.values(), *self.incoming.values()):
            for lf in session.files:
                keys |= lf.handler.hardware(lf.state)[2]
        return keys

    def session_closed(self, session: Session) -> None:
        session.file = None
        if session.incoming:
            # luo_session_release: a retrieved session is finished, then removed.
            # If the finish fails the release returns early: the session stays
            # in the incoming list, still marked retrieved (RETRIEVE_SESSION is
            # EINVAL from then on), with its files.
            try:
                self.finish(session)
            except KernelError as e:
                log.warning("unable to finish session %s on release: %s", session.name, e)
                return
            self.incoming.pop(session.name, None)
            return
        for lf in reversed(session.files):
            self._unpreserve(lf)
        session.files.clear()
        self.outgoing.pop(session.name, None)

    # --- files ---------------------------------------------------------------------------------

    def preserve(self, session: Session, token: int, fd: int | None) -> None:
        """luo_preserve_file, in its order: a used token EEXIST, a bad fd
        EBADF, no handler ENOENT, a file preserved already EBUSY."""
        if session.find(token) is not None:
            raise KernelError(errno.EEXIST, f"token {token:#x} is used in session {session.name!r}")
        if fd is None:
            raise KernelError(errno.EBADF)
        target = self.kernel.lookup(fd) or RealFile(fd)
        handler = next((h for h in self.handlers if h.can_preserve(target)), None)
        if handler is None:
            if isinstance(target, RealFile):
                target.close()
            raise KernelError(errno.ENOENT, "no live update handler for this file type")
        identity = target.inode if isinstance(target, File) else target.key
        if identity in self.preserved:
            owner = next((s for s in self.outgoing.values() if self.preserved[identity] in s.files), None)
            if owner is not None and owner is not session:
                self.kernel.alive(owner.file)  # a session closed meanwhile has unpreserved its files
        if identity in self.preserved:
            if isinstance(target, RealFile):
                target.close()
            raise KernelError(errno.EBUSY, "the file is already preserved")
        lf = LuoFile(token, handler, target, identity=identity)
        if isinstance(target, File):
            lf.ref_fd = os.dup(fd)  # LUO's reference keeps the file alive
        try:
            self.kernel.inject("preserve", handler.compatible, session.name)
            lf.state = handler.preserve(lf) or {}
        except BaseException:
            lf.drop_ref()
            raise
        session.files.append(lf)
        self.preserved[identity] = lf

    def _unpreserve(self, lf: LuoFile) -> None:
        try:
            lf.handler.unpreserve(lf)
        finally:
            self.preserved.pop(lf.identity, None)
            lf.drop_ref()

    def retrieve_fd(self, session: Session, token: int) -> int:
        lf = session.find(token)
        if lf is None:
            raise KernelError(errno.ENOENT, f"no file with token {token:#x}")
        if lf.retrieve_status < 0:
            raise KernelError(-lf.retrieve_status)
        if lf.retrieve_status == 0:
            try:
                self.kernel.inject("retrieve", lf.handler.compatible, session.name)
                lf.target = lf.handler.retrieve(lf)
            except KernelError as e:
                lf.retrieve_status = -e.errno
                raise
            lf.retrieve_status = 1
            if isinstance(lf.target, File):
                client = self.kernel.install(lf.target)
                lf.ref_fd = os.dup(client)  # kept until FINISH, like get_file()
                return client
        if isinstance(lf.target, File):
            return os.dup(lf.ref_fd)
        return os.dup(lf.target)

    def finish(self, session: Session) -> None:
        for lf in session.files:
            self.kernel.inject("finish", lf.handler.compatible, session.name)
            if not lf.handler.can_finish(lf):
                raise KernelError(errno.EBUSY, f"{lf.handler.compatible} token {lf.token:#x} cannot finish yet")
        for lf in reversed(session.files):
            if lf.retrieve_status == 0:
                try:
                    lf.target = lf.handler.retrieve(lf)
                    lf.retrieve_status = 1
                except KernelError as e:
                    lf.retrieve_status = -e.errno
            lf.handler.finish(lf)
            if lf.ref_fd >= 0:
                os.close(lf.ref_fd)
                lf.ref_fd = -1
            if isinstance(lf.target, int):
                os.close(lf.target)
                lf.target = None
        # luo_file_finish empties the file set; the session itself stays in
        # the incoming list, retrieved, until its fd is closed
        # (luo_session_release): RETRIEVE_SESSION of it is EINVAL meanwhile.
        session.files.clear()
        self.kernel.collect_memory()  # what only the handover kept: its retrievers have it now

    # --- kexec -------------------------------------------------------------------------------------

    def freeze(self) -> dict:
        frozen: list[LuoFile] = []
        try:
            for session in self.outgoing.values():
                for lf in session.files:
                    self.kernel.inject("freeze", lf.handler.compatible, session.name)
                    lf.state = lf.handler.freeze(lf) or lf.state
                    lf.frozen = True
                    frozen.append(lf)
        except BaseException:
            for lf in reversed(frozen):
                try:
                    lf.handler.unfreeze(lf)
                finally:
                    lf.frozen = False
            raise
        return {"compatible": LUO_COMPATIBLE, "sessions": [
            {"name": s.name,
             "files": [{"token": lf.token, "compatible": lf.handler.compatible, "data": lf.state}
                       for lf in s.files]}
            for s in self.outgoing.values()]}

    def unfreeze(self) -> None:
        for session in self.outgoing.values():
            for lf in reversed(session.files):
                if lf.frozen:
                    lf.handler.unfreeze(lf)
                    lf.frozen = False

    def preserved_hardware(self):
        bdfs, domains, memory = set(), set(), set()
        for session in self.outgoing.values():
            for lf in session.files:
                b, d, m = lf.handler.hardware(lf.state)
                bdfs |= b
                domains |= d
                memory |= m
        return bdfs, domains, memory

    def list_node(self, path: str) -> None:
        return None

    def drop(self) -> None:
        for session in list(self.outgoing.values()) + list(self.incoming.values()):
            for lf in session.files:
                lf.drop_ref()
                if isinstance(lf.target, int):
                    os.close(lf.target)
        self.outgoing.clear()
        self.incoming.clear()
        self.preserved.clear()

    def restore(self, tree: dict) -> None:
        """luo_early_startup + luo_session_deserialize.  A LUO tree of another
        ABI (its compatible, or its shape) is a KernelPanic: the kernel
        panics (luo_restore_fail).  A session or file this kernel cannot take
        -- a file whose compatible no handler has (luo_file_deserialize_one:
        -ENOENT), a session name twice (luo_session_insert: -EEXIST) -- fails
        the deserialization: the sessions are leaked and every open of
        /dev/liveupdate is EIO for this boot (luo_open)."""
        if not tree:
            return
        if tree.get("compatible") != LUO_COMPATIBLE:
            raise _incompatible()
        try:
            sessions = [(str(s["name"]), [(int(f["token"]), str(f["compatible"]), f["data"]) for f in s["files"]])
                        for s in tree.get("sessions", [])]
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise _incompatible(f" ({type(e).__name__}: {e})") from None
        by_compatible = {h.compatible: h for h in self.handlers}
        for name, files in sessions:
            if name in self.incoming:
                self.restore_error = f"Failed to insert session [{name}] -EEXIST"
                log.warning("%s", self.restore_error)
                return
            session = Session(name, incoming=True)
            self.incoming[name] = session
            for token, compatible, data in files:
                handler = by_compatible.get(compatible)
                if handler is None:
                    self.restore_error = (f"No registered handler for compatible '{compatible}': "
                                          f"failed to deserialize files for session [{name}] -ENOENT")
                    log.warning("%s", self.restore_error)
                    session.files.clear()
                    return
                lf = LuoFile(token, handler, state=data)
                handler.restore(lf)
                session.files.append(lf)

    def status(self) -> list[dict]:
        out = []
        for kind, sessions in (("outgoing", self.outgoing), ("incoming", self.incoming)):
            for s in sessions.values():
                out.append({"name": s.name, "direction": kind, "retrieved": s.retrieved,
                            "files": [{"token": lf.token, "type": lf.handler.compatible,
                                       "retrieved": lf.retrieve_status == 1} for lf in s.files]})
        return out


register_subsystem("luo", LuoSubsystem)  # first: at kexec it lets go of files before the others drop
