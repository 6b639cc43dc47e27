"""The shape of the repo, held by tests: one-way imports, notebooks that are reports, small documented modules.

(a) helpers/ import graph (AST, function-level imports included): no cycle among modules or among packages;
    core imports only core; a step package uses another only through its namespace (`from helpers.eval
    import mmlu_pro`, names its __init__ offers), never `helpers.<pkg>.<module>`; production code never
    imports helpers.toy.synth, tests or bench.
(b) notebooks: one parameters cell of commented UPPER_CASE literals; other code cells at most 15 lines,
    no def/class, no UPPER_CASE names but ROOT (nb.params takes those as parameters); committed without outputs.
(c) every module opens with a docstring holding a `Usage:` line and stays under 420 lines.
(d) every name a step package's lazy table offers exists in the module named for it.
"""

from __future__ import annotations

import ast
import io
import json
import tokenize
from functools import cache
from pathlib import Path

import pytest

from helpers.nb import NOT_PARAMETERS

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "helpers"
STEP_PACKAGES = ("toy", "finetune", "experts", "layers", "eval", "benchmarks")
PACKAGES = ("core", *STEP_PACKAGES)
MAX_CELL_LINES = 15
MAX_MODULE_LINES = 420


# ---- the import graph --------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(HELPERS.rglob("*.py"))}


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text())


def package_of(name: str) -> str:
    """core, a step package, or top (helpers/__init__, cli, runner, nb, plots, ...)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in PACKAGES) else "top"


@cache
def lazy_table(package: str) -> dict[str, list[str]]:
    """{module: [names]} of `lazy_names(globals(), {...})` in helpers/<package>/__init__.py ({} when none)."""
    for node in ast.walk(tree(f"helpers.{package}")):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_names" and len(node.args) == 2:
            return ast.literal_eval(node.args[1])
    return {}


def offered(package: str) -> dict[str, str]:
    """Names `from helpers.<package> import NAME` may take ({name: module it lives in}): __all__ of the package."""
    table = lazy_table(package)
    out = {m: m for m in table}
    out.update({n: m for m, names in table.items() for n in names})
    return out


def imports(name: str):
    """(line, imported module, names or None, how it was written) for every import in module `name`."""
    is_pkg = modules()[name].name == "__init__.py"
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None, f"import {a.name}"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [a.name for a in node.names]
            yield node.lineno, base, names, f"from {'.' * node.level}{node.module or ''} import {', '.join(names)}"


def targets(module: str, names: list[str] | None) -> set[str]:
    """The helpers modules an import really loads (lazy package names resolved to their module)."""
    mods = modules()
    if not (module == "helpers" or module.startswith("helpers.")):
        return set()
    if names is None:
        return {module} if module in mods else set()
    out = set()
    for n in names:
        if f"{module}.{n}" in mods:
            out.add(f"{module}.{n}")
        elif module.count(".") == 1 and module.split(".")[1] in PACKAGES and n in offered(module.split(".")[1]):
            out.add(f"{module}.{offered(module.split('.')[1])[n]}")
        elif module in mods:
            out.add(module)
    return out


def namespace_uses(name: str) -> set[str]:
    """Modules reached through a package bound as a name (`from helpers import finetune`; `finetune.train_lora`)."""
    bound = {}  # local name -> package
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.ImportFrom) and node.module == "helpers" and not node.level:
            bound |= {a.asname or a.name: a.name for a in node.names if a.name in PACKAGES}
        elif isinstance(node, ast.Import):
            bound |= {a.asname: a.name.split(".")[1] for a in node.names if a.asname and a.name.count(".") == 1}
    out = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            pkg = bound[node.value.id]
            if pkg in PACKAGES and node.attr in offered(pkg):
                out.add(f"helpers.{pkg}.{offered(pkg)[node.attr]}")
    return out


@cache
def graph() -> dict[str, set[str]]:
    return {
        m: ({t for _, mod, names, _ in imports(m) for t in targets(mod, names)} | namespace_uses(m)) - {m}
        for m in modules()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_among_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_among_packages():
    edges: dict[str, set[str]] = {}
    why: dict[tuple[str, str], str] = {}
    for m, ts in graph().items():
        for t in ts:
            a, b = package_of(m), package_of(t)
            if a != b:
                edges.setdefault(a, set()).add(b)
                why.setdefault((a, b), f"{m} -> {t}")
    cycle = find_cycle(edges)
    assert cycle is None, "package cycle: " + ", ".join(f"{why[(a, b)]}" for a, b in zip(cycle, cycle[1:]))


def test_core_imports_only_core():
    bad = [
        f"{m}:{line}: {how}"
        for m in modules()
        if package_of(m) == "core"
        for line, mod, names, how in imports(m)
        if any(package_of(t) != "core" for t in targets(mod, names))
    ]
    assert not bad, "core must not import step packages or the top:\n" + "\n".join(bad)


def test_step_packages_use_each_other_through_their_namespace():
    bad = []
    for m in modules():
        own = package_of(m)
        if own not in STEP_PACKAGES:
            continue
        for line, mod, names, how in imports(m):
            parts = mod.split(".")
            if parts[0] != "helpers" or len(parts) < 2 or parts[1] not in STEP_PACKAGES or parts[1] == own:
                continue
            other = parts[1]
            if len(parts) > 2 or names is None:
                bad.append(f"{m}:{line}: {how}  (use `from helpers.{other} import ...`)")
            else:
                missing = [n for n in names if n not in offered(other)]
                if missing:
                    bad.append(f"{m}:{line}: {how}  ({missing} not in helpers.{other}.__all__)")
    assert not bad, "step packages reach into each other:\n" + "\n".join(bad)


def test_production_code_never_imports_test_factories():
    bad = []
    for m in modules():
        if m == "helpers.toy.synth":
            continue
        for line, mod, names, how in imports(m):
            loads = targets(mod, names)
            if "helpers.toy.synth" in loads or mod.split(".")[0] in ("tests", "bench", "conftest"):
                bad.append(f"{m}:{line}: {how}")
    assert not bad, "production code imports test/bench code:\n" + "\n".join(bad)


def test_the_graph_sees_lazy_and_function_level_imports():
    """The checks above are only as good as the graph: it resolves namespace names and nested imports."""
    assert targets("helpers.eval", ["mmlu_pro"]) == {"helpers.eval.mmlu_pro"}
    name, module = next((n, m) for n, m in offered("eval").items() if n != m)
    assert targets("helpers.eval", [name]) == {f"helpers.eval.{module}"}
    nested = [
        m
        for m in modules()
        for node in ast.walk(tree(m))
        if isinstance(node, ast.FunctionDef)
        for sub in ast.walk(node)
        if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("helpers")
    ]
    assert nested and all(graph()[m] for m in nested)
    stages = Path(HELPERS / "layers/stages.py")
    if stages.exists() and "from helpers import finetune" in stages.read_text():  # a namespace bound as a name
        assert "helpers.finetune.train" in graph()["helpers.layers.stages"]


# ---- notebooks ---------------------------------------------------------------------------------------------

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _python(src: str) -> str:
    """Cell source with IPython magics and shell lines blanked (so ast can read it)."""
    return "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines())


def _cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text())["cells"]


def _is_params(cell) -> bool:
    return "parameters" in cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_parameters_cell_is_commented_literal_data(nb):
    tagged = [c for c in _cells(nb) if _is_params(c)]
    assert len(tagged) == 1, f"{nb.name}: {len(tagged)} cells tagged 'parameters' (want exactly one)"
    src = _source(tagged[0])
    assert tagged[0]["cell_type"] == "code"
    comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    bad = []
    for node in ast.parse(src).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            bad.append(f"line {node.lineno}: not NAME = literal")
            continue
        name = node.targets[0].id
        if not name.isupper():
            bad.append(f"{name}: not UPPER_CASE")
        try:
            ast.literal_eval(node.value)
        except ValueError:
            bad.append(f"{name}: not a literal")
        if not comments & set(range(node.lineno, node.end_lineno + 1)):
            bad.append(f"{name}: no comment saying what it is")
    assert not bad, f"{nb.name} parameters cell:\n" + "\n".join(bad)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_code_cells_are_short_and_define_nothing(nb):
    bad = []
    for i, cell in enumerate(_cells(nb)):
        if cell["cell_type"] != "code" or _is_params(cell):
            continue
        src = _source(cell).rstrip()
        lines = len(src.splitlines())
        if lines > MAX_CELL_LINES:
            bad.append(f"cell {i} ({cell.get('id')}): {lines} lines > {MAX_CELL_LINES}")
        for node in ast.walk(ast.parse(_python(src))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bad.append(f"cell {i} ({cell.get('id')}): defines {node.name} (move it into helpers/)")
            bound = [node.id] if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) else []
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound = [a.asname or a.name for a in node.names]
            for name in bound:  # nb.params(globals()) takes UPPER_CASE names as parameters
                if name.isupper() and name not in NOT_PARAMETERS:
                    bad.append(f"cell {i} ({cell.get('id')}): binds {name} (UPPER_CASE is for parameters)")
    assert not bad, f"{nb.name}:\n" + "\n".join(bad)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(nb):
    bad = [
        f"cell {i} ({c.get('id')})"
        for i, c in enumerate(_cells(nb))
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not bad, f"{nb.name}: outputs or execution counts in " + ", ".join(bad) + " (nbstripout --keep-id)"


# ---- modules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(modules()), ids=str)
def test_module_opens_with_usage_docstring_and_stays_small(name):
    path = modules()[name]
    doc = ast.get_docstring(tree(name))
    assert doc, f"{path.relative_to(ROOT)}: no module docstring"
    assert any(ln.strip().startswith("Usage:") for ln in doc.splitlines()), (
        f"{path.relative_to(ROOT)}: the docstring has no `Usage:` line"
    )
    n = len(path.read_text().splitlines())
    assert n < MAX_MODULE_LINES, f"{path.relative_to(ROOT)}: {n} lines (split it by concern below {MAX_MODULE_LINES})"


def _top_level_names(body: list[ast.stmt]) -> set[str]:
    """Names a module binds at its top level (inside if/try/with blocks too, never inside defs)."""
    out = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        for block in ("body", "orelse", "finalbody"):
            out |= _top_level_names(getattr(node, block, []))
        for handler in getattr(node, "handlers", []):
            out |= _top_level_names(handler.body)
    return out


@pytest.mark.parametrize("package", STEP_PACKAGES)
def test_lazy_table_names_exist(package):
    table = lazy_table(package)
    assert table, f"helpers/{package}/__init__.py offers no lazy_names table"
    bad = []
    for module, names in table.items():
        full = f"helpers.{package}.{module}"
        if full not in modules():
            bad.append(f"{module}: no module helpers/{package}/{module}.py")
            continue
        have = _top_level_names(tree(full).body)
        bad += [f"{module}.{n}: not defined there" for n in names if n not in have]
    assert not bad, f"helpers.{package} offers names that do not exist:\n" + "\n".join(bad)
