"""Files a user names for luvmm to write -- the demo's report directory, a
``--json FILE`` -- written as a tool that root runs must write them.

Never through a symlink: each file is made new beside its name
(O_CREAT|O_EXCL|O_NOFOLLOW, a random name) and renamed over it, which
replaces a symlink there rather than follow it.  Never in a directory that
someone else could swap things in: the directory must be this user's (or
root's), reached without a symlink as its last component, and writable by
nobody else -- unless it is sticky (as /tmp is), where nobody else can
rename over or remove what is ours, and a name someone else holds there
makes the rename fail (EPERM) instead of write through it.  Anything else
is refused with one line (:class:`UnsafeOutput`), before a long run rather
than after it.
"""

from __future__ import annotations

import os
import stat


class UnsafeOutput(OSError):
    """A directory or file luvmm will not write into, and why (one line)."""


def _check_dir(path: str, st: os.stat_result) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeOutput(f"{path}: not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeOutput(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): "
                           "its owner could swap what luvmm writes there")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UnsafeOutput(f"{path}: others may write into it (mode {stat.S_IMODE(st.st_mode):o}): "
                           "they could swap what luvmm writes there")


def open_dir(path: str, *, create: bool = False) -> int:
    """An fd of directory ``path`` (made, 0755, if ``create`` and missing)
    to write files in with :func:`write_in`; UnsafeOutput if luvmm must not."""
    if create:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError as e:
            raise UnsafeOutput(f"cannot make {path}: {e.strerror or e}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise UnsafeOutput(f"{path} is a symlink: give the directory itself") from None
        raise UnsafeOutput(f"{path}: {e.strerror or e}") from None
    try:
        _check_dir(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_in(dirfd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """``name`` in the directory ``dirfd``, written whole, never through what
    was there (OSError if it cannot be)."""
    tmp = f".{name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
        raise


def check_dir(path: str) -> None:
    """UnsafeOutput unless luvmm may write files in directory ``path``, or
    make it (checked before a long run; changes nothing)."""
    if os.path.lexists(path):
        os.close(open_dir(path))
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.close(open_dir(parent))
    if not os.access(parent, os.W_OK):
        raise UnsafeOutput(f"cannot make {path}: cannot write in {parent}")


def check_file(path: str) -> None:
    """UnsafeOutput unless :func:`write_file` may write ``path``: a name in
    a directory it may write in (checked before a long run)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and not os.path.islink(path):
        raise UnsafeOutput("is a directory")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UnsafeOutput(f"cannot write in {parent}")
    os.close(open_dir(parent))


def write_file(path: str, data: bytes) -> None:
    """``path`` written whole, never through a symlink, in a directory no one
    else may swap things in (UnsafeOutput, or OSError if it cannot be)."""
    fd = open_dir(os.path.dirname(os.path.abspath(path)))
    try:
        write_in(fd, os.path.basename(path), data)
    finally:
        os.close(fd)
