"""Debian's kernel source, fetched with apt through a private sources list.

The machine's own apt set-up is never changed: the mirror is read from its
sources (deb822 ``/etc/apt/sources.list.d/*.sources`` or one-line
``sources.list``), and every apt call runs with its sources list, its lists,
its package cache and its archives in the lab's cache dir::

    apt-get -o Dir::Etc::SourceList=PRIVATE -o Dir::Etc::SourceParts=/dev/null \\
            -o Dir::State::Lists=PRIVATE -o Dir::Cache=PRIVATE -o Dir::Cache::Archives=PRIVATE ...

``apt-get download`` fetches the .deb (nothing is installed), ``dpkg-deb``
and ``tar`` unpack the source tarball it carries.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

from luvmm.lab import LabError

#: The suite that carries the newest kernels, and which of its source packages
#: the lab builds: the newest ``linux-source-7.*`` it carries.  (Debian sid
#: carries one at a time, e.g. linux-source-7.2; a newer one replaces it.)
SUITE = "sid"
PACKAGE_PATTERN = re.compile(r"^linux-source-(7\.\d+)$")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, current, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
            continue
        if ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def mirror_from_system(etc: str = "/etc/apt") -> tuple[str, str]:
    """(mirror URI, keyring) of the machine's Debian archive entry: the first
    ``deb`` source whose URI is a Debian archive (not debian-security)."""
    entries: list[tuple[str, str]] = []
    for path in sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources"))):
        try:
            text = open(path).read()
        except OSError:
            continue
        for stanza in _deb822_stanzas(text):
            if "deb" not in stanza.get("types", "").split() or stanza.get("enabled", "yes") == "no":
                continue
            keyring = stanza.get("signed-by", "")
            if "\n" in keyring or keyring.startswith("-----"):
                keyring = ""  # an inline key: use the archive keyring instead
            for uri in stanza.get("uris", "").split():
                entries.append((uri, keyring))
    for path in [os.path.join(etc, "sources.list")] + sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.list"))):
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = re.match(r"^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
            if m:
                options = m.group(1) or ""
                k = re.search(r"signed-by=(\S+?)[\s\]]", options + " ")
                entries.append((m.group(2), k.group(1) if k else ""))
    for uri, keyring in entries:
        if "security" in uri:
            continue
        if uri.rstrip("/").endswith("/debian") or "debian" in uri:
            return uri.rstrip("/"), keyring or DEFAULT_KEYRING
    return DEFAULT_MIRROR, DEFAULT_KEYRING


class PrivateApt:
    """apt-get and apt-cache with a private sources list, lists and caches."""

    def __init__(self, root: str, mirror: str | None = None, keyring: str | None = None):
        self.root = root
        if mirror is None:
            mirror, keyring = mirror_from_system()
        self.mirror, self.keyring = mirror, keyring or DEFAULT_KEYRING
        self.sources = os.path.join(root, "sources.list")
        self.lists = os.path.join(root, "lists")
        self.cache = os.path.join(root, "cache")
        self.archives = os.path.join(root, "archives")

    def _options(self) -> list[str]:
        user = _user_name()
        return ["-o", f"Dir::Etc::SourceList={self.sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={self.lists}", "-o", f"Dir::Cache={self.cache}",
                "-o", f"Dir::Cache::Archives={self.archives}",
                "-o", "Dir::Etc::Preferences=/dev/null", "-o", "Dir::Etc::PreferencesParts=/dev/null",
                "-o", "Acquire::Languages=none", "-o", f"APT::Sandbox::User={user}"]

    def _run(self, tool: str, *args: str, cwd: str | None = None) -> str:
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is not installed: the lab fetches Debian's kernel source with apt "
                           "(or give --kernel-src DIR)")
        result = subprocess.run([tool, *self._options(), *args], capture_output=True, text=True, cwd=cwd)
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise LabError(f"{tool} {args[0]} failed: {detail}")
        return result.stdout

    def update(self) -> None:
        for d in (os.path.join(self.lists, "partial"), os.path.join(self.archives, "partial"), self.cache):
            os.makedirs(d, exist_ok=True)
        with open(self.sources, "w") as f:
            f.write(f"deb [signed-by={self.keyring}] {self.mirror} {SUITE} main\n")
        self._run("apt-get", "-qq", "update")

    def newest_kernel_source(self) -> tuple[str, str, int]:
        """(package, version, size in bytes) of the newest linux-source-7.* in the suite."""
        names = [n for n in self._run("apt-cache", "pkgnames", "linux-source-").split()
                 if PACKAGE_PATTERN.match(n)]
        if not names:
            raise LabError(f"Debian {SUITE} at {self.mirror} carries no linux-source-7.* package")
        name = max(names, key=lambda n: tuple(int(x) for x in PACKAGE_PATTERN.match(n).group(1).split(".")))
        info = self._run("apt-cache", "show", "--no-all-versions", name)
        version = re.search(r"^Version: (\S+)", info, re.M)
        size = re.search(r"^Size: (\d+)", info, re.M)
        if not version:
            raise LabError(f"apt-cache show {name} gave no version")
        return name, version.group(1), int(size.group(1)) if size else 0

    def download(self, package: str, version: str) -> str:
        """apt-get download (no install) into the private archives; returns the .deb."""
        os.makedirs(self.archives, exist_ok=True)
        self._run("apt-get", "-qq", "download", f"{package}={version}", cwd=self.archives)
        debs = glob.glob(os.path.join(self.archives, f"{package}_{version.replace(':', '%3a')}_*.deb"))
        if not debs:
            raise LabError(f"apt-get download {package}={version} left no .deb in {self.archives}")
        return debs[0]


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return "root"


def unpack_source(deb: str, package: str, dest: str) -> str:
    """Unpack the kernel tree of a linux-source-X.Y .deb into ``dest``; returns
    the tree (dest/linux-source-X.Y).  Done in a temporary sibling directory and
    renamed, so an interrupted unpack leaves nothing that looks complete."""
    tree = os.path.join(dest, package)
    if os.path.exists(os.path.join(tree, "Makefile")):
        return tree
    os.makedirs(dest, exist_ok=True)
    tmp = os.path.join(dest, f".unpack-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        member = f"./usr/src/{package}.tar.xz"
        deb_tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
        inner = subprocess.Popen(["tar", "-xO", member], stdin=deb_tar.stdout, stdout=subprocess.PIPE)
        deb_tar.stdout.close()
        unpack = subprocess.run(["tar", "-xJ", "-C", tmp], stdin=inner.stdout, capture_output=True, text=True)
        inner.stdout.close()
        if inner.wait() or deb_tar.wait() or unpack.returncode:
            raise LabError(f"unpacking {os.path.basename(deb)} failed: {unpack.stderr.strip() or 'tar error'}")
        if not os.path.exists(os.path.join(tmp, package, "Makefile")):
            raise LabError(f"{os.path.basename(deb)} holds no {package}/Makefile")
        shutil.rmtree(tree, ignore_errors=True)
        os.rename(os.path.join(tmp, package), tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree
