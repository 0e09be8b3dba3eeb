"""The structure the code must keep (issue 16), checked from its imports
(every import, also the ones inside functions): the product and the
emulator apart, and no import cycles -- between packages, or between the
modules of one package."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOP = ("luvmm", "vmm", "devices", "liveupdate", "metrics")
#: The emulated host: only it, the entry points that wire it, and the tests may import these.
EMULATOR = ("devices.emu", "liveupdate.emu")
#: The entry points that wire the emulated host: the CLI, its tools, and the one host-wiring module.
WIRING = ("luvmm.cli", "luvmm.tools", "luvmm.wiring")


#: Modules the project generates (luvmm.uapi.build_cache: the uAPI cdefs parsed once), present
#: once a host has started: a module of the graph whether or not the file is there yet.
GENERATED = {"luvmm._uapi_ffi": os.path.join(ROOT, "luvmm", "_uapi_ffi.py")}


def modules() -> dict[str, str]:
    found = {}
    for top in TOP:
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__")) and d != "firmware"]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    found[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
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
        if module.startswith("vmm"):
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
