"""The shape of the code, measured: what a newcomer reads first, how big the pieces are, what reading
the leaderboard costs. Several trees side by side (say, main before and after a change):

    python bench/code_shape.py                        # this tree
    python bench/code_shape.py /tmp/before .          # two trees, one column each

Reported per tree:
- README.md's lines and KB;
- modules over 500 lines, functions over 60 lines, the share of imports made inside functions;
- import circles between modules (as Python runs them, and counting ``if TYPE_CHECKING:`` imports);
- whether ``import medpeft_ray.leaderboard`` imports torch or ray, and its import time;
- the wall time of ``medpeft-ray leaderboard`` on a leaderboard of 200 rows (median of 5 runs, each
  a fresh interpreter, the trees alternating so that the machine's load falls on both alike).
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))
from test_architecture import import_cycles, import_graph  # noqa: E402  (the architecture test's own scan)

ROWS = 200
RUNS = 5


def _functions(tree: ast.AST) -> list[ast.AST]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def static_shape(root: Path) -> dict[str, object]:
    """Sizes, long functions and import placement, from the source alone."""
    package = root / "medpeft_ray"
    readme = (root / "README.md").read_bytes()
    big_modules, long_functions, inside, total = [], 0, 0, 0
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > 500:
            big_modules.append(f"{path.relative_to(root)} ({lines})")
        tree = ast.parse(text)
        functions = _functions(tree)
        long_functions += sum(1 for f in functions if f.end_lineno - f.lineno + 1 > 60)
        nested = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        total += len(imports)
        inside += sum(1 for n in imports if id(n) in nested)
    return {
        "README lines": readme.count(b"\n"),
        "README KB": round(len(readme) / 1024, 1),
        "modules over 500 lines": len(big_modules),
        "functions over 60 lines": long_functions,
        "imports inside functions": f"{inside}/{total} ({100 * inside / max(total, 1):.0f}%)",
        "import circles (run time)": len(import_cycles(import_graph(package))),
        "import circles (with TYPE_CHECKING)": len(import_cycles(import_graph(package, type_checking=True))),
        "_big": big_modules,
    }


def _python(root: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], env=env, cwd=root,
                          capture_output=True, text=True, check=True)


def leaderboard_import(root: Path) -> dict[str, object]:
    """What ``import medpeft_ray.leaderboard`` brings in, from Python's own import timing."""
    done = _python(root, "import medpeft_ray.leaderboard")
    top = {line.rsplit("|", 1)[-1].strip(): line for line in done.stderr.splitlines() if "|" in line}
    cumulative = top.get("medpeft_ray.leaderboard", "0|0|").split("|")[1]
    return {
        "leaderboard import imports torch": "torch" in top,
        "leaderboard import imports ray": "ray" in top,
        "leaderboard import ms": round(int(cumulative.strip() or 0) / 1000),
    }


def make_leaderboard(folder: Path) -> None:
    """A leaderboard of ROWS completed trials, written through this tree's store."""
    from conftest import fill_results, leaderboard_row

    rows = [leaderboard_row(f"t{i}", ("lora", "full", "bitfit", "adapter")[i % 4], (0.01, 0.1, 1.0)[i % 3],
                            0.6 + (i % 37) / 100) for i in range(ROWS)]
    fill_results(folder, *rows)


CLI = "import sys; from medpeft_ray.cli import main; sys.argv = ['medpeft-ray', *sys.argv[1:]]; main()"


def leaderboard_command(roots: list[Path], results: Path) -> list[dict[str, object]]:
    """Per tree: what ``medpeft-ray leaderboard`` and ``--compare`` import, and the median wall time of
    the first, the trees taking turns."""
    found: list[dict[str, object]] = []
    for root in roots:
        shown = {}
        for name, extra in (("leaderboard", ()), ("leaderboard --compare methods", ("--compare", "methods"))):
            done = _python(root, CLI, "leaderboard", "--results", str(results), *extra)
            imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
            shown[f"`{name}` imports torch, ray"] = f"{'torch' in imported}, {'ray' in imported}"
        found.append(shown)
    times: list[list[float]] = [[] for _ in roots]
    for _ in range(RUNS):
        for i, root in enumerate(roots):
            start = time.perf_counter()
            _python(root, CLI, "leaderboard", "--results", str(results))
            times[i].append(time.perf_counter() - start)
    for shown, spent in zip(found, times):
        shown[f"`leaderboard` s ({ROWS} rows)"] = round(statistics.median(spent), 2)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[HERE], help="repository roots (default: this one)")
    roots = [t.resolve() for t in parser.parse_args().trees]
    for root in roots:
        if not (root / "README.md").is_file() or not (root / "medpeft_ray").is_dir():
            parser.error(f"{root}: not a medpeft-ray checkout (no README.md and medpeft_ray/ there)")
    shapes = [{**static_shape(root), **leaderboard_import(root)} for root in roots]
    with tempfile.TemporaryDirectory() as scratch:
        make_leaderboard(Path(scratch))
        for shape, command in zip(shapes, leaderboard_command(roots, Path(scratch))):
            shape.update(command)
    names = [k for k in shapes[0] if not k.startswith("_")]
    width = max(len(n) for n in names)
    print(f"{'':{width}}  " + "  ".join(f"{r.name:>14}" for r in roots))
    for name in names:
        print(f"{name:{width}}  " + "  ".join(f"{str(s[name]):>14}" for s in shapes))
    for root, shape in zip(roots, shapes):
        if shape["_big"]:
            print(f"\n{root.name}: modules over 500 lines: " + ", ".join(shape["_big"]))


if __name__ == "__main__":
    main()
