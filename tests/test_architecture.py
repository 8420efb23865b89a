"""The house rules a test can hold (docs/architecture.md), from a static scan of every import
statement in medpeft_ray (those inside functions too: a lazy import only postpones a circle to run
time; those of ``if TYPE_CHECKING:`` blocks where a rule says so).

- No two modules import each other, even lazily or for types only.
- Each top-level module and package has a floor (``FLOORS``); imports point down the floors.
- The ground floor (errors, schema, metrics, label_ratios) imports nothing above it.
- The leaderboard's store (rows) and views (DataFrames) do not import each other.
- Every registered dataset format has a tiny published layout exercised end to end.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medpeft_ray"
GROUND_FLOOR = {"medpeft_ray.errors", "medpeft_ray.schema", "medpeft_ray.metrics", "medpeft_ray.label_ratios"}

#: Each top-level module or package of medpeft_ray and its floor (docs/architecture.md): a module
#: imports from its own package or from a lower floor, never from its floor or above. ``train`` and
#: ``leaderboard`` share a floor: training writes no rows and reading rows needs no training code.
FLOORS = {
    "medpeft_ray": 0, "medpeft_ray.errors": 0, "medpeft_ray.fault_points": 0,
    "medpeft_ray.schema": 1, "medpeft_ray.metrics": 1, "medpeft_ray.label_ratios": 1, "medpeft_ray.storage": 1,
    "medpeft_ray.samples": 1,
    "medpeft_ray.data": 2, "medpeft_ray.evaluation": 2,
    "medpeft_ray.models": 3,
    "medpeft_ray.methods": 4,
    "medpeft_ray.config": 5,
    "medpeft_ray.train": 6, "medpeft_ray.leaderboard": 6,
    "medpeft_ray.search": 7,
    "medpeft_ray.cli": 8,
}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(package: Path = PACKAGE, type_checking: bool = False) -> dict[str, set[str]]:
    """Each module's imported medpeft_ray modules; ``from X import Y`` names X, and X.Y if Y is a module.

    ``type_checking`` counts the imports of ``if TYPE_CHECKING:`` blocks too (they never run, so a
    circle through one is harmless at run time, but it still says two modules know each other).
    """
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()

        def visit(node: ast.AST) -> None:
            if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
                for child in node.orelse:
                    visit(child)
                return
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base in modules:
                    found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[name] = found - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_the_ground_floor_imports_only_the_ground_floor() -> None:
    graph = import_graph()
    for module in GROUND_FLOOR:
        assert graph[module] <= GROUND_FLOOR, (module, graph[module] - GROUND_FLOOR)


def test_store_and_views_do_not_import_each_other() -> None:
    graph = import_graph()
    store, views = "medpeft_ray.leaderboard.store", "medpeft_ray.leaderboard.views"
    leaderboard = {m for m in graph if m.startswith("medpeft_ray.leaderboard")}
    # neither reaches the other, the package (which imports both) or the module that joins them
    assert not graph[store] & (leaderboard - {store}), graph[store]
    assert not graph[views] & (leaderboard - {views}), graph[views]


def test_no_two_modules_import_each_other_even_lazily() -> None:
    """Not inside a function, nor for types only: a circle of ``if TYPE_CHECKING:`` imports still
    says two modules know each other (a protocol on the lower one breaks it)."""
    assert import_cycles(import_graph(type_checking=True)) == []


def _package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_package_floors_are_one_way() -> None:
    """Packages import downwards only: no circle between them either (config never imports search)."""
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        outside = {_package_of(t) for t in targets} - {_package_of(module), "medpeft_ray"}
        packages.setdefault(_package_of(module), set()).update(outside)
    assert import_cycles(packages) == []


def test_every_module_has_a_floor() -> None:
    """A new top-level module or package says where it sits before anything may import it."""
    assert {_package_of(m) for m in import_graph()} - set(FLOORS) == set()


def test_no_import_climbs_a_floor() -> None:
    """Imports point down the floors (or stay inside their package), those of ``if TYPE_CHECKING:``
    blocks and those inside functions included: a lazy import only hides a climb until it runs."""
    climbs = sorted(
        f"{module} (floor {FLOORS[_package_of(module)]}) imports {target} (floor {FLOORS[_package_of(target)]})"
        for module, targets in import_graph(type_checking=True).items() for target in targets
        if _package_of(target) != _package_of(module) and FLOORS[_package_of(target)] >= FLOORS[_package_of(module)]
    )
    assert climbs == [], "\n".join(climbs)


def test_every_dataset_format_is_exercised_end_to_end() -> None:
    """A new format gets a tiny published layout in test_datasets_e2e.FORMATS (its pre-flight runs there)."""
    import test_datasets_e2e

    from medpeft_ray.data import list_datasets

    assert set(list_datasets()) - {"synthetic"} == set(test_datasets_e2e.FORMATS)
