"""dpkit's import graph, read from the source with ast: no cycles, and the recipe schema a leaf.

Every `import` / `from` statement counts, also those inside functions and under TYPE_CHECKING:
an import hidden in a function is still a dependency, and hiding it there is how cycles were
kept out of sight. The names a recipe may use (dpkit/names.py) are tied to the runtime
registries here too.
"""

import ast
import subprocess
import sys
from pathlib import Path
from typing import get_args

import dpkit

ROOT = Path(dpkit.__file__).parent

# Cycles still in the code, as debt: this list may only shrink (a new cycle fails, and so does
# an entry here that is gone, so that it is deleted).
KNOWN_CYCLES: list[set[str]] = []


def module_files() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def _owner(name: str) -> str | None:
    """The dpkit module an imported name lives in (`dpkit.data.load.collate` → dpkit.data.load)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> tuple[set[str], set[str]]:
    """(dpkit modules, top-level third-party packages) that `module` imports anywhere in it."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from dpkit import data` imports the module dpkit.data; `from dpkit.x import f`, dpkit.x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "dpkit":
                ours.add(_owner(name))
            else:
                theirs.add(name.split(".")[0])
    ours.discard(module)
    return ours, theirs


# The recipe schema: what `dpkit validate` needs and what every module may import.
SCHEMA = {"dpkit.recipe", "dpkit.hub_schema", "dpkit.compute_schema", "dpkit.moe_schema",
          "dpkit.eval.schema", "dpkit.schema_errors", "dpkit.overrides",
          # the method declarations (their sections, formats and checks)
          *(m for m in MODULES if m == "dpkit.methods" or m.startswith("dpkit.methods."))}
# The leaves the schema may stand on (no torch, no runtime code). `dpkit` and `dpkit.eval` are
# the packages the schema modules sit in: importing a submodule runs them.
LEAVES = {"dpkit", "dpkit.eval", "dpkit.errors", "dpkit.shipped"}
HEAVY = {"torch", "transformers", "deepspeed", "datasets", "peft", "accelerate"}

GRAPH = {m: imports(m)[0] for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def with_packages(modules: set[str]) -> set[str]:
    """Importing dpkit.a.b runs dpkit/__init__ and dpkit/a/__init__ first."""
    out = set(modules)
    for m in modules:
        while "." in m:
            m = m.rpartition(".")[0]
            out.add(m)
    return out


def reach(start: set[str]) -> set[str]:
    """Every dpkit module that importing `start` can run (packages included)."""
    seen, todo = set(), list(with_packages(start))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(with_packages(GRAPH[m]))
    return seen


def test_the_walk_sees_what_python_imports():
    """The walker itself: known edges, including one inside a function and a relative one."""
    assert {"dpkit.errors", "dpkit.hub_schema"} <= GRAPH["dpkit.recipe"]
    assert "dpkit.checkpoint" in GRAPH["dpkit.rundir"]  # imported inside functions only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_new_import_cycles():
    found = cycles(GRAPH)
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles (break them: move the shared part down): {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


def test_the_schema_is_a_leaf():
    reached = reach(SCHEMA)
    assert reached <= SCHEMA | LEAVES, \
        f"the recipe schema imports runtime modules: {sorted(reached - SCHEMA - LEAVES)}"
    heavy = {m: imports(m)[1] & HEAVY for m in reached}
    assert not any(heavy.values()), f"the recipe schema imports {heavy}"


def test_importing_the_recipe_loads_no_torch():
    """The same, asked of Python itself in a fresh interpreter."""
    code = ("import sys, dpkit.recipe; "
            f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_method_names_are_the_runtime_registry():
    """Every method the schema accepts has a runtime class (an Objective), its settings section
    is a recipe section, and the formats it trains on share one row kind that loads."""
    from dpkit.methods import FORMATS, METHODS, load
    from dpkit.objectives import Objective, objective_class
    from dpkit.recipe import Recipe

    assert get_args(Recipe.model_fields["objective"].annotation) == tuple(METHODS)
    for name, spec in METHODS.items():
        assert issubclass(objective_class(name), Objective), name
        assert spec.section is None or spec.section in Recipe.model_fields, (name, spec.section)
        assert spec.head in ("causal_lm", "sequence_classification"), (name, spec.head)
        kinds = {FORMATS[f].rows for f in spec.formats}
        assert len(kinds) == 1, (name, kinds)
        load(kinds.pop())


def test_format_names_are_the_format_registry():
    """Every declared format renders: the data format registry holds it, or its row kind
    brings its own `Format`; the schema lists them in the declaration order."""
    from dpkit.data.formats import get
    from dpkit.methods import FORMATS

    for name, spec in FORMATS.items():
        assert get(name).columns == spec.columns, name
    from dpkit.recipe import DataSource

    assert get_args(DataSource.model_fields["format"].annotation) == tuple(FORMATS)


def test_nothing_outside_a_method_names_one():
    """A method's name appears only in its own modules (dpkit/methods/<m>.py, dpkit/objectives/,
    its data rows): the rest of dpkit asks the registry."""
    import re

    from dpkit.methods import METHODS

    own = ("methods/", "objectives/", "data/preference.py")
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(n for n in METHODS if n != "sft"))
    found = [f"{path.relative_to(ROOT)}:{n}" for path in ROOT.rglob("*.py")
             if not str(path.relative_to(ROOT)).startswith(own)
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, f"method names outside their modules: {found}"


# The layers, bottom first: a module may import its own layer and those below, never above
# (docs/architecture.md draws them top down). A pattern ending in * takes a package and its
# modules; the longest matching pattern places a module.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["dpkit", "dpkit.errors", "dpkit.shipped", "dpkit.run_files"]),
    ("schema", ["dpkit.recipe", "dpkit.hub_schema", "dpkit.compute_schema", "dpkit.eval.schema",
                "dpkit.schema_errors", "dpkit.overrides", "dpkit.methods*", "dpkit.moe_schema"]),
    ("infrastructure", ["dpkit.batch", "dpkit.layout", "dpkit.zero", "dpkit.rundir",
                        "dpkit.distributed", "dpkit.logs", "dpkit.run_info"]),
    ("data", ["dpkit.data*"]),
    ("model", ["dpkit.heads", "dpkit.model", "dpkit.attention", "dpkit.kernels", "dpkit.lora",
               "dpkit.parallel*", "dpkit.moe", "dpkit.moe_layout"]),
    ("training", ["dpkit.metrics", "dpkit.checkpoint", "dpkit.objectives*", "dpkit.eval*",
                  "dpkit.engine", "dpkit.step",
                  "dpkit.consolidate"]),  # the writer of export and of the final save
    ("readers of runs", ["dpkit.plan*", "dpkit.model_card", "dpkit.report", "dpkit.export",
                         "dpkit.hub"]),
    ("the loop", ["dpkit.run", "dpkit.train"]),
    ("commands", ["dpkit.preflight", "dpkit.launch", "dpkit.doctor", "dpkit.cli*"]),
]

# Upward imports still in the code, as debt: may only shrink (like KNOWN_CYCLES).
KNOWN_UPWARD: set[tuple[str, str]] = {
    ("dpkit.lora", "dpkit.export"),      # the merge writes through export's staging helper
    ("dpkit.rundir", "dpkit.checkpoint"),  # a run directory is recognised by its checkpoints
}


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            hit = (module == p[:-1] or module.startswith(p[:-1] + ".")) if p.endswith("*") \
                else module == p
            if hit and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def test_every_module_has_a_layer_and_no_import_goes_up():
    upward = {(m, d) for m, deps in GRAPH.items() for d in deps if layer_of(d) > layer_of(m)}
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, ("imports from a higher layer (move the shared part down, or the module "
                     f"up): {[f'{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})' for m, d in new]}")
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"fixed: delete from KNOWN_UPWARD: {gone}"
