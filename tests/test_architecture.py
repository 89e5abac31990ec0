"""The package map in the README holds: no module imports a higher layer, and no relative imports.

Layers, lowest first: foundation (errors, names, contract, digest, files, randomness, norms) < keys, localdocs,
models, metrics < protocol, privacy, secagg, store, aggregation < bank, coordinator < report < cli. Imports only
read for type checking (under `if TYPE_CHECKING:`) do not count: they never run.
"""

import ast
from pathlib import Path

from helpers import ROOT

LAYERS = {
    **dict.fromkeys(["errors", "names", "contract", "digest", "files", "randomness", "norms"], 0),
    **dict.fromkeys(["keys", "localdocs", "models", "metrics"], 1),
    **dict.fromkeys(["protocol", "privacy", "secagg", "store", "aggregation"], 2),
    **dict.fromkeys(["bank", "coordinator"], 3),
    "report": 4,
    "scorecard": 4,  # the verified global as points (uses bank.inference's checks)
    "export": 4,  # ONNX and the model card (uses bank.inference's checks)
    "audit": 4,
    "cli": 5,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "fedcli" else None


def _runtime_imports(tree: ast.AST):
    """ImportFrom nodes outside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in skip]


def _imports():
    for path in sorted((ROOT / "fedcli").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in _runtime_imports(ast.parse(path.read_text())):
            yield module, node


def test_every_fedcli_module_has_a_layer():
    missing = {m for m, _ in _imports() if m.count(".") and _layer(m) is None and not m.endswith("__init__")}
    assert not missing, f"add these to LAYERS (and to the README's layout table): {sorted(missing)}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, node in _imports():
        targets = [f"fedcli.{a.name}" for a in node.names] if node.module == "fedcli" else [node.module or ""]
        for target in targets:
            mine, theirs = _layer(module), _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_imports_are_absolute():
    relative = [f"{m}: from {'.' * n.level}{n.module or ''}" for m, n in _imports() if n.level]
    assert not relative, relative


def test_the_readme_layout_names_every_package():
    readme = Path(ROOT / "README.md").read_text()
    packages = sorted(p.name for p in (ROOT / "fedcli").iterdir() if (p / "__init__.py").exists())
    assert all(f"`{p}/`" in readme for p in packages), packages


def test_python_dash_m_sees_every_command():
    """`python -m fedcli.cli` runs the app at the `__main__` block: commands defined below it would be missing."""
    text = (ROOT / "fedcli" / "cli.py").read_text()
    assert text.rstrip().endswith('if __name__ == "__main__":\n    app()')
    assert text.count("__main__") == 1
