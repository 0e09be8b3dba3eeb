"""The structure the code must keep (issue 16), checked from its imports
(every import, also the ones inside functions): the product and the
emulator apart, and no import cycles -- between packages, or between the
modules of one package."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOP = ("luvmm", "vmm", "devices", "liveupdate", "metrics")
#: The emulated host: only it, the entry points that wire it, and the tests may import these.
EMULATOR = ("luvmm.devices.emu", "luvmm.liveupdate.emu")
#: The entry points that wire the emulated host: the CLI, its tools, and the one host-wiring module.
WIRING = ("luvmm.cli", "luvmm.tools", "luvmm.wiring")


#: Modules the project generates (luvmm.uapi.build_cache: the uAPI cdefs parsed once), present
#: once a host has started: a module of the graph whether or not the file is there yet.
GENERATED = {"luvmm._uapi_ffi": os.path.join(ROOT, "luvmm", "_uapi_ffi.py")}


def modules() -> dict[str, str]:
    """Every module by its one import name: ``luvmm.*``, the component
    folders at the repository's top included (luvmm/__init__.py)."""
    found = {}
    for top in TOP:
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__")) and d != "firmware"]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    name = rel if top == "luvmm" else f"luvmm.{rel}"
                    found[name.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return found


def _known() -> dict[str, str]:
    """Every module an import may name: the files, and the generated ones."""
    return {**GENERATED, **modules()}


def imports_of(name: str, path: str, known: dict) -> set[str]:
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            submodules = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known}
            out.update(submodules)
            if len(submodules) < len(node.names):  # `from pkg import sub` imports sub, not pkg's contents
                out.add(module)
    resolved = set()
    for target in out:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


#: module -> the project modules it imports.  ``__main__`` modules are left
#: out: they are entry points (``python -m luvmm`` runs the CLI), not layers.
GRAPH = {name: imports_of(name, path, _known()) for name, path in modules().items()
         if not name.endswith("__main__")}


PATHS = _known()


def package_of(module: str) -> str:
    """A package is its __init__ and its modules (its subpackages are packages of their own)."""
    if PATHS[module].endswith("__init__.py"):
        return module
    return module.rpartition(".")[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        mine = package_of(module)
        packages.setdefault(mine, set()).update(p for p in map(package_of, targets) if p != mine)
    assert cycles(packages) == []


def test_no_import_cycle_between_the_modules_of_a_package():
    for package in {package_of(m) for m in GRAPH}:
        members = {m for m in GRAPH if package_of(m) == package}
        local = {m: GRAPH[m] & members for m in members}
        assert cycles(local) == [], package


def test_the_product_never_imports_the_emulator():
    leaks = {m: sorted(t for t in targets if t.startswith(EMULATOR))
             for m, targets in GRAPH.items() if not m.startswith(EMULATOR + WIRING)}
    assert {m: t for m, t in leaks.items() if t} == {}


def test_the_vmm_imports_no_emulator_module_nor_the_wiring():
    for module, targets in GRAPH.items():
        if module.startswith("luvmm.vmm"):
            assert not [t for t in targets if t.startswith(EMULATOR + ("luvmm.cli", "luvmm.tools"))], module


def test_the_uapi_tables_are_the_bottom_layer():
    """luvmm.abi and the uAPI modules import nothing of the project above them."""
    for module, targets in GRAPH.items():
        if module == "luvmm.abi" or module.startswith("luvmm.uapi") and module != "luvmm.uapi.table":
            assert targets <= {"luvmm.abi", "luvmm._uapi_ffi"} | {m for m in GRAPH if m.startswith("luvmm.uapi")}, \
                (module, targets)


def test_no_feature_test_of_the_host_object():
    """The product asks for services it is handed (luvmm.services), never
    whether its host object happens to have a method."""
    offenders = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr") and node.args \
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in ("host", "self.host"):
                offenders.append(module)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and node.args \
                    and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "host":
                offenders.append(module)
    assert offenders == []


# --- one import name, and its layers (issue 25) ------------------------------------------------

#: The layers of luvmm/__init__.py, bottom to top: a module is in the layer of
#: the longest prefix listed.  An import goes down, or stays in its layer.
LAYERS = (
    ("the kernel ABI and the host interface", ("luvmm", "luvmm.abi", "luvmm._uapi_ffi", "luvmm.uapi", "luvmm.host",
                                               "luvmm.names", "luvmm.wire", "luvmm.leanjson", "luvmm.schema",
                                               "luvmm.exitcodes", "luvmm.outfiles")),
    ("inter-process calls", ("luvmm.rpc", "luvmm.peer", "luvmm.services")),
    ("the components", ("luvmm.devices", "luvmm.liveupdate", "luvmm.vmm")),
    ("metrics and presentation", ("luvmm.metrics",)),
    ("the command line, tools, lab and wiring", ("luvmm.cli", "luvmm.tools", "luvmm.lab", "luvmm.wiring")),
)

#: The imports that still go up, each to be taken out (issue 25, item 3): the
#: emulated host's daemon and the VMM's control plane serve /metrics with the
#: metrics layer's exposition; the VMM's unit main wires its host.  None may
#: be added; one taken out is taken off this list.
GOING_UP = {
    ("luvmm.liveupdate.emu.daemon", "luvmm.metrics.core"),
    ("luvmm.liveupdate.emu.daemon", "luvmm.metrics.host"),
    ("luvmm.liveupdate.emu.daemon", "luvmm.metrics.http"),
    ("luvmm.vmm.control", "luvmm.metrics.core"),
    ("luvmm.vmm.control", "luvmm.metrics.http"),
    ("luvmm.vmm.control", "luvmm.metrics.vmm"),
    ("luvmm.vmm.process", "luvmm.wiring"),
}


def layer_of(module: str) -> int:
    found = [(len(prefix), n) for n, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
    assert found, f"{module} is in no layer of LAYERS"
    return max(found)[1]


def test_imports_go_down_the_layers():
    up = {(m, t) for m, targets in GRAPH.items() for t in targets if layer_of(t) > layer_of(m)}
    assert up - GOING_UP == set(), "imports going up a layer"
    assert GOING_UP - up == set(), "gone: take them off GOING_UP"


def python_files(*tops: str):
    for top in tops:
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
            yield from (os.path.join(dirpath, f) for f in files if f.endswith(".py"))


def test_the_project_is_imported_by_its_one_name():
    """From a checkout `import vmm` works too (the folder is there): code
    that did it would load a second copy of every module it reaches."""
    bare = {t for t in TOP if t != "luvmm"}
    found = []
    for path in python_files(*TOP, "tests"):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            found += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in bare]
    assert found == []


def test_the_distribution_installs_one_import_name(monkeypatch):
    """setup.py installs every package of the checkout, each under ``luvmm.``."""
    import runpy

    import setuptools

    got = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    assert {p.split(".")[0] for p in got["packages"]} == {"luvmm"}
    packages = {name for name, path in modules().items() if path.endswith("__init__.py")}
    assert set(got["packages"]) == packages
    for package, folder in got["package_dir"].items():
        assert os.path.isfile(os.path.join(ROOT, folder, "__init__.py")), package


def test_errors_name_their_errno():
    """An OSError's errno is named (errno.ENOENT), never a number: the
    numbers are the kernel's, and a reader checks them against its names."""
    found = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and type(node.args[0].value) is int and len(node.args) >= 2 \
                    and getattr(node.func, "id", getattr(node.func, "attr", "")).endswith("Error"):
                found.append(f"{module}:{node.lineno}")
    assert found == []


#: A module this long is read as several: its docstring says why it is one.
LONG_MODULE = 500


def test_a_long_module_says_why_it_is_one():
    long = []
    for module, path in modules().items():
        text = open(path).read()
        if text.count("\n") > LONG_MODULE and "Why this long:" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(module)
    assert long == []
