"""``luvmm lab build``: the lab kernel, its uAPI headers and the LUO selftests.

The source is Debian's newest ``linux-source-7.*`` (:mod:`luvmm.lab.debian`)
or the user's own tree.  The config is virtme-ng's minimal one
(``x86_64_defconfig`` plus ``virtme-configkernel --defconfig``'s items) with
``luvmm/lab/config/lab.config`` over it, and the user's own fragments over
that; every line of every fragment is checked in the final ``.config``.

Builds are out of tree, in ``<cache>/builds/<key>/`` where the key hashes the
source's identity (package and version, or the tree's path) and every config
input.  A build is complete when its ``lab.json`` exists; ``<cache>/current``
points at the last one built.  The compiler runs at nice 19.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

from luvmm.lab import LAB_CONFIG, LabError, cache_dir

#: Bump when the way a lab kernel is configured or built changes.
RECIPE = 1
ARCH = "x86_64"
IMAGE = "arch/x86/boot/bzImage"
SELFTESTS = "tools/testing/selftests/liveupdate"
#: The selftests that run in stages across a kexec (the others need none).
KEXEC_SELFTESTS = ("luo_kexec_simple", "luo_multi_session", "luo_stress_sessions", "luo_stress_files")
MANIFEST = "lab.json"

_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc", "perl": "perl"}
_HEADERS = {"libelf-dev": "/usr/include/gelf.h", "libssl-dev": "/usr/include/openssl/opensslv.h"}


class Source:
    """A kernel tree to build, and what identifies it."""

    def __init__(self, tree: str, identity: str, label: str, debian: dict | None = None):
        self.tree, self.identity, self.label, self.debian = tree, identity, label, debian

    def to_dict(self) -> dict:
        return {"tree": self.tree, "identity": self.identity, "label": self.label, "debian": self.debian}


# --- output -------------------------------------------------------------------------------------

class Progress:
    """One status line that updates in place on a terminal, and a line now and
    then otherwise (CI logs)."""

    def __init__(self, stream=None, interval: float = 30.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval
        self._last = 0.0
        self._shown = False

    def say(self, text: str) -> None:
        self.clear()
        print(text, file=self.stream, flush=True)

    def update(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self._shown = True
        elif now - self._last >= self.interval:
            print(text, file=self.stream, flush=True)
            self._last = now

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- prerequisites --------------------------------------------------------------------------------

def check_build_tools() -> None:
    missing = [pkg for tool, pkg in _TOOLS.items() if shutil.which(tool) is None]
    missing += [pkg for pkg, header in _HEADERS.items() if not os.path.exists(header)]
    if missing:
        raise LabError(f"missing kernel build tools: {' '.join(sorted(set(missing)))} "
                       f"(Debian: apt-get install make gcc flex bison bc perl libelf-dev libssl-dev)")
    if shutil.which("virtme-configkernel") is None:
        raise LabError("virtme-ng is not installed (the lab's base config and its runner): "
                       "pip install 'luvmm[lab]' or pip install virtme-ng")


def virtme_ng_version() -> str:
    try:
        from importlib.metadata import version

        return version("virtme-ng")
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return "unknown"


# --- the source ----------------------------------------------------------------------------------

def tree_version(tree: str) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL(EXTRAVERSION) of a kernel tree's Makefile."""
    fields = {}
    with open(os.path.join(tree, "Makefile")) as f:
        for line in f:
            m = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(.*?)\s*$", line)
            if m:
                fields[m.group(1)] = m.group(2)
            if len(fields) == 4:
                break
    return f"{fields.get('VERSION', '?')}.{fields.get('PATCHLEVEL', '?')}.{fields.get('SUBLEVEL', '?')}" \
           f"{fields.get('EXTRAVERSION', '')}"


def user_tree(path: str) -> Source:
    tree = os.path.realpath(path)
    if not os.path.isfile(os.path.join(tree, "Makefile")) or not os.path.isdir(os.path.join(tree, "kernel")):
        raise LabError(f"--kernel-src {path}: not a kernel source tree (no Makefile and kernel/)")
    if not os.path.isdir(os.path.join(tree, "kernel", "liveupdate")):
        raise LabError(f"--kernel-src {path}: this tree has no Live Update Orchestrator (kernel/liveupdate/)")
    if os.path.exists(os.path.join(tree, ".config")) or os.path.isdir(os.path.join(tree, "include", "config")):
        raise LabError(f"--kernel-src {path} was configured in tree: the lab builds out of tree, "
                       f"so run `make mrproper` there first")
    version = tree_version(tree)
    return Source(tree, f"tree:{tree}", f"{tree} ({version})")


def debian_source(cache: str, progress: Progress) -> Source:
    from luvmm.lab import debian

    apt = debian.PrivateApt(os.path.join(cache, "apt"))
    try:
        apt.update()
        package, version, size = apt.newest_kernel_source()
    except LabError as e:
        unpacked = _unpacked_debian_sources(cache)
        if not unpacked:
            raise LabError(f"cannot fetch Debian's kernel source ({e}); give --kernel-src DIR") from None
        package, version, tree = unpacked[-1]
        progress.say(f"Debian is out of reach ({e}); using the source already here: {package} {version}")
        return _debian(package, version, tree, apt.mirror)
    src = os.path.join(cache, "src", f"{package}_{version}")
    tree = os.path.join(src, package)
    if not os.path.exists(os.path.join(tree, "Makefile")):
        progress.say(f"fetching {package} {version} from Debian {debian.SUITE} ({apt.mirror}, "
                     f"{size / 1e6:.0f} MB)")
        deb = apt.download(package, version)
        progress.say(f"unpacking {os.path.basename(deb)}")
        tree = debian.unpack_source(deb, package, src)
        os.remove(deb)  # the unpacked tree is what is kept
    return _debian(package, version, tree, apt.mirror)


def _debian(package: str, version: str, tree: str, mirror: str) -> Source:
    from luvmm.lab import debian

    return Source(tree, f"debian:{package}={version}", f"Debian {debian.SUITE} {package} {version}",
                  {"suite": debian.SUITE, "package": package, "version": version, "mirror": mirror})


def _unpacked_debian_sources(cache: str) -> list[tuple[str, str, str]]:
    found = []
    root = os.path.join(cache, "src")
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        package, _, version = entry.partition("_")
        tree = os.path.join(root, entry, package)
        if os.path.exists(os.path.join(tree, "Makefile")):
            found.append((package, version, tree))
    return found


# --- config ----------------------------------------------------------------------------------------

def parse_fragment(text: str) -> dict[str, str]:
    """CONFIG_X=value and "# CONFIG_X is not set" (= "n") lines of a fragment."""
    wanted = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            wanted[m.group(1)] = m.group(2)
            continue
        m = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            wanted[m.group(1)] = "n"
    return wanted


def config_mismatches(config_text: str, wanted: dict[str, str]) -> list[str]:
    have = {}
    for line in config_text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line.strip())
        if m:
            have[m.group(1)] = m.group(2)
    return [f"{k}={v} (the final .config has {have.get(k, 'n')})" for k, v in wanted.items()
            if have.get(k, "n") != v]


def build_key(source: Source, fragments: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    h.update(f"recipe {RECIPE}\nsource {source.identity}\nbase virtme-ng {virtme_ng_version()} "
             f"{ARCH}_defconfig\n".encode())
    for name, text in fragments:
        h.update(f"fragment {name}\n{text}\n".encode())
    return h.hexdigest()[:12]


def _make(tree: str, build: str, *targets: str, jobs: int | None = None, log=None,
          progress: Progress | None = None, what: str = "", extra: tuple[str, ...] = ()) -> int:
    """make in ``tree`` with O=build at nice 19; returns the number of objects
    compiled.  The full output goes to ``log``; failures raise LabError with its tail."""
    cmd = ["make", "-C", tree, f"O={build}", f"ARCH={'x86'}", *extra]
    if jobs:
        cmd.append(f"-j{jobs}")
    cmd += list(targets)
    return _run_logged(cmd, log=log, progress=progress, what=what)


def _run_logged(cmd: list[str], *, log, progress: Progress | None, what: str, cwd: str | None = None,
                env: dict | None = None) -> int:
    start = time.monotonic()
    objects = 0
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env=env, preexec_fn=lambda: os.nice(19), errors="replace")
    try:
        for line in proc.stdout:
            if log:
                log.write(line)
            tail.append(line.rstrip("\n"))
            del tail[:-25]
            if re.match(r"^\s+(CC|AS)\s", line):
                objects += 1
                if progress and what:
                    progress.update(f"{what}: {objects} objects compiled, {_duration(time.monotonic() - start)}")
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if progress:
            progress.clear()
    if rc != 0:
        errors = [t for t in tail if "rror" in t] or tail[-8:]
        raise LabError(f"{what or ' '.join(cmd[:3])} failed (exit {rc}): {errors[-1].strip() if errors else ''}"
                       + (f" -- full log: {log.name}" if log else ""))
    return objects


def configure(source: Source, build: str, fragments: list[tuple[str, str]], log, progress: Progress) -> None:
    """virtme-ng's minimal config, then the fragments, then olddefconfig; check them."""
    os.makedirs(build, exist_ok=True)
    progress.say("configuring: x86_64_defconfig + virtme-ng's minimal config + "
                 + " + ".join(name for name, _ in fragments))
    config = os.path.join(build, ".config")
    if os.path.exists(config):
        os.remove(config)  # virtme-configkernel --defconfig starts from scratch
    _run_logged(["virtme-configkernel", "--defconfig", f"O={build}"], cwd=source.tree, log=log, progress=None,
                what="virtme-configkernel --defconfig")
    with open(config, "a") as f:
        for name, text in fragments:
            f.write(f"\n# --- {name} ---\n{text}\n")
    _make(source.tree, build, "olddefconfig", log=log, what="make olddefconfig")
    wanted = {}
    for _, text in fragments:
        wanted.update(parse_fragment(text))
    bad = config_mismatches(open(config).read(), wanted)
    if bad:
        raise LabError("the config fragments do not hold in the final .config (missing dependencies?): "
                       + "; ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else ""))


def build_selftests(source: Source, build: str, log, progress: Progress) -> str:
    out = os.path.join(build, "selftests", "liveupdate")
    os.makedirs(out, exist_ok=True)
    headers = os.path.join(build, "usr", "include")
    tests = os.path.join(source.tree, SELFTESTS)
    before = set(os.listdir(tests))
    try:
        _run_logged(["make", "-C", tests, f"OUTPUT={out}", f"KHDR_INCLUDES=-isystem {headers}"],
                    log=log, progress=progress, what="LUO selftests")
    finally:
        # Its Makefile leaves the tests' objects beside their sources: take them
        # out again, so a user's tree is as it was.
        for name in set(os.listdir(tests)) - before:
            if name.endswith((".o", ".d")):
                os.remove(os.path.join(tests, name))
    for name in ("liveupdate",) + KEXEC_SELFTESTS:
        if not os.access(os.path.join(out, name), os.X_OK):
            raise LabError(f"the LUO selftests built no {name} in {out}")
    shutil.copy(os.path.join(source.tree, SELFTESTS, "do_kexec.sh"), out)
    return out


# --- the build --------------------------------------------------------------------------------------

def fragments_for(extra: list[str]) -> list[tuple[str, str]]:
    fragments = [("luvmm/lab/config/lab.config", open(LAB_CONFIG).read())]
    for path in extra:
        try:
            fragments.append((os.path.abspath(path), open(path).read()))
        except OSError as e:
            raise LabError(f"--config {path}: {e.strerror}") from None
        if not parse_fragment(fragments[-1][1]):
            raise LabError(f"--config {path}: no CONFIG_ lines in it")
    return fragments


def build(kernel_src: str | None = None, config: list[str] | None = None, jobs: int | None = None,
          progress: Progress | None = None) -> dict:
    """Build (or find cached) a lab kernel; returns its manifest."""
    progress = progress or Progress()
    check_build_tools()
    fragments = fragments_for(config or [])
    cache = cache_dir()
    os.makedirs(cache, exist_ok=True)
    source = user_tree(kernel_src) if kernel_src else debian_source(cache, progress)
    key = build_key(source, fragments)
    build_dir = os.path.join(cache, "builds", key)
    manifest_path = os.path.join(build_dir, MANIFEST)
    if source.debian and os.path.exists(manifest_path):
        manifest = find(build_dir)
        if manifest is not None:
            _set_current(cache, key)
            manifest["cached"] = True
            return manifest
    jobs = jobs or os.cpu_count() or 1
    progress.say(f"building the lab kernel from {source.label} in {build_dir} (make -j{jobs}, nice 19)")
    start = time.monotonic()
    cpu_start = _children_cpu()
    os.makedirs(build_dir, exist_ok=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # incomplete until written again
    with open(os.path.join(build_dir, "build.log"), "w") as log:
        configure(source, build_dir, fragments, log, progress)
        objects = _make(source.tree, build_dir, "bzImage", jobs=jobs, log=log, progress=progress,
                        what="compiling")
        kernel_seconds = time.monotonic() - start
        kernel_cpu = _children_cpu() - cpu_start
        # `make headers` installs the uAPI headers into <build>/usr/include
        # (headers_install would only copy them elsewhere, with rsync).
        _make(source.tree, build_dir, "headers", log=log, what="make headers")
        selftests = build_selftests(source, build_dir, log, progress)
        release = subprocess.run(["make", "-s", "-C", source.tree, f"O={build_dir}", "kernelrelease"],
                                 capture_output=True, text=True).stdout.strip().splitlines()
    manifest = {
        "key": key,
        "kernelrelease": release[-1] if release else tree_version(source.tree),
        "source": source.to_dict(),
        "fragments": [name for name, _ in fragments],
        "base": f"{ARCH}_defconfig + virtme-ng {virtme_ng_version()}",
        "build_dir": build_dir,
        "image": os.path.join(build_dir, IMAGE),
        "headers": os.path.join(build_dir, "usr", "include"),
        "selftests": selftests,
        "objects": objects,
        "kernel_build_seconds": round(kernel_seconds, 1),
        "kernel_build_cpu_seconds": round(kernel_cpu, 1),
        "build_seconds": round(time.monotonic() - start, 1),
        "jobs": jobs,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, manifest_path)
    _set_current(cache, key)
    manifest["cached"] = False
    return manifest


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process (make and its compilers)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _set_current(cache: str, key: str) -> None:
    link = os.path.join(cache, "current")
    tmp = f"{link}.{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.join("builds", key), tmp)
    os.replace(tmp, link)


def find(kernel: str | None = None) -> dict | None:
    """The manifest of a built lab kernel: ``kernel`` (a build dir or its key),
    else the last one built; None if there is none."""
    cache = cache_dir()
    if kernel is None:
        candidate = os.path.join(cache, "current")
    elif os.path.isdir(kernel):
        candidate = kernel
    else:
        candidate = os.path.join(cache, "builds", kernel)
    path = os.path.join(candidate, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    # The build's files are where the manifest is (a cache may have been moved).
    base = os.path.dirname(os.path.realpath(path))
    manifest.update(build_dir=base, image=os.path.join(base, IMAGE), headers=os.path.join(base, "usr", "include"),
                    selftests=os.path.join(base, "selftests", "liveupdate"))
    source = manifest.get("source", {})
    debian = source.get("debian")
    if debian and not os.path.isdir(source.get("tree", "")):
        source["tree"] = os.path.join(cache, "src", f"{debian['package']}_{debian['version']}", debian["package"])
    if not os.path.exists(manifest["image"]):
        return None
    return manifest


def describe(manifest: dict) -> str:
    lines = [f"lab kernel {manifest['kernelrelease']} from {manifest['source']['label']} (config {manifest['key']})",
             f"  image      {manifest['image']}",
             f"  headers    {manifest['headers']}",
             f"  selftests  {manifest['selftests']}"]
    how = "cached: built" if manifest.get("cached") else "built"
    cpu = manifest.get("kernel_build_cpu_seconds")
    lines.append(f"  {how} {manifest['built_at']}: kernel in {_duration(manifest['kernel_build_seconds'])} "
                 f"({manifest['objects']} objects, -j{manifest['jobs']}"
                 + (f", {_duration(cpu)} of CPU" if cpu is not None else "")
                 + f"), everything in {_duration(manifest['build_seconds'])}")
    return "\n".join(lines)
