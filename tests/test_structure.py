"""The shape of the code: data flows one way, and no user's file is ever unpickled.

Both are read from the source (every import, including those inside functions), so a cycle or a
pickle load is caught where it is written, not only when some test happens to reach it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("workbench", "analyses")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of this project that `path` imports, at any depth of its code."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb node.level - 1 packages up from this one
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def test_the_engine_never_imports_the_analyses():
    offenders = {m: sorted(d for d in deps if d.startswith("analyses"))
                 for m, deps in _graph().items() if m.startswith("workbench")}
    assert not {m: d for m, d in offenders.items() if d}, "workbench/ must find analyses through entry points"


def test_the_workbench_package_has_no_import_cycles():
    graph = {m: {d for d in deps if d.startswith("workbench")} for m, deps in _graph().items()
             if m.startswith("workbench")}
    graph = {m: deps - {"workbench"} for m, deps in graph.items() if m != "workbench"}  # the re-exporting __init__
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


# The layers, lowest first, and what each may import. Data flows one way: model → adapter → cache →
# compute → Result → figures → report. The foundation (errors, configs, artifact files, the disk writes
# under them, strict JSON) sits under everything; the command line sits over everything.
FOUNDATION = {"workbench.errors", "workbench.config", "workbench.artifacts", "workbench.disk",
              "workbench.strict_json", "workbench.allocator"}
MAY_IMPORT = {
    "data": set(),
    "model": {"data"},
    "train": {"data", "model"},
    "adapter": {"data", "model"},
    "cache": {"data", "model", "adapter"},
    "sae": {"data", "model", "adapter", "cache", "train"},
    "compute": {"data", "model", "adapter", "cache", "sae"},
    "report": {"data", "model", "adapter", "cache", "sae", "compute", "train"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    if module in FOUNDATION or len(parts) < 2:
        return "foundation"
    return parts[1]


def test_each_layer_imports_only_the_layers_below_it():
    offenders = []
    for module, deps in _graph().items():
        layer = _layer(module)
        if not module.startswith("workbench.") or layer not in MAY_IMPORT:
            continue
        allowed = MAY_IMPORT[layer] | {layer, "foundation"}
        offenders += [f"{module} imports {d}" for d in sorted(deps)
                      if d.startswith("workbench.") and _layer(d) not in allowed]
    assert not offenders, "imports against the layers:\n" + "\n".join(offenders)


def test_data_and_model_never_reach_cache_compute_or_report():
    graph = _graph()
    for start in ("workbench.data", "workbench.model"):
        reach, todo = set(), [m for m in graph if m == start or m.startswith(start + ".")]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in reach:
                    reach.add(d)
                    todo.append(d)
        bad = sorted(d for d in reach if _layer(d) in {"cache", "compute", "report", "sae"})
        assert not bad, f"{start} reaches {bad}"


def test_the_foundation_imports_no_layer():
    graph = _graph()
    bad = {m: sorted(d for d in graph[m] if d.startswith("workbench.") and _layer(d) != "foundation")
           for m in FOUNDATION if m in graph}
    assert not any(bad.values()), bad


def test_every_module_belongs_to_a_layer():
    """A new module goes into the package of its layer (docs/guide/architecture.md), not beside them."""
    top = {m for m in _graph() if m.count(".") == 1 and m.startswith("workbench.")}
    loose = sorted(top - FOUNDATION - {f"workbench.{p}" for p in MAY_IMPORT} - {"workbench.cli", "workbench.__main__"})
    assert not loose, f"modules outside the layers: {loose}"


UNSAFE = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|torch\.load\(|trust_remote_code\s*=\s*True|"
                    r"np\.load\([^)]*allow_pickle\s*=\s*True|joblib\.load\(")


def test_nothing_unpickles_or_runs_remote_code():
    hits = []
    for pkg in (*PACKAGES, "benchmarks"):
        for path in (ROOT / pkg).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if UNSAFE.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "loads that can run code from a user's file:\n" + "\n".join(hits)


def test_front_end_code_lives_in_asset_files():
    """JavaScript and CSS are .js and .css files under workbench/report/assets (linted, highlighted, shipped as
    package data), not strings inside Python modules."""
    js = re.compile(r"document\.|addEventListener|\bfunction\s*\w*\s*\([^)]*\)\s*\{|=>\s*\{")
    css_rule = re.compile(r"[.#a-zA-Z*][\w.#:>-]*\{[a-z-]+:[^}]*\}")
    offenders = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            found = len(js.findall(text)) + (len(css_rule.findall(text)) > 2)
            if found:
                offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, offenders
    from workbench.report.assets import read_asset
    from workbench.report.widgets import WIDGETS_JS

    for name in ("widgets.js", "widgets.css", "report.css", "dashboard.css", "dashboard.js"):
        assert read_asset(name).strip()
    assert WIDGETS_JS.startswith("var WB_WIDGETS_CSS = ") and ".wb-attn{" in WIDGETS_JS


def test_every_module_has_a_page_in_the_api_reference():
    """docs/api/ has one page per package; a module missing from it has no reference documentation."""
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", pages, flags=re.M))
    modules = {m for m in _graph() if m.startswith("workbench.") and not m.rsplit(".", 1)[-1].startswith("_")}
    missing = sorted(modules - documented - {"workbench.cli"})
    assert not missing, f"modules with no docs/api page entry: {missing}"


def test_private_names_stay_inside_their_package():
    """A `_name` may be shared between the modules of one package (the adapter's arithmetic that takes
    an explicit Architecture), never imported by another package or by a study."""
    offenders = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            me = _module_name(path)
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workbench.")):
                    continue
                theirs = ".".join(node.module.split(".")[:2])
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and not me.startswith(theirs + "."):
                    offenders.append(f"{me} imports {private} from {node.module}")
    assert not offenders, "\n".join(offenders)
