"""Draw rqpipe's import graph as Mermaid (the picture in docs/architecture.md).

    python docs/import_graph.py [ROOT]          # the tree at ROOT (default: this checkout)
    python docs/import_graph.py --modules model  # one node per module under model/

Nodes are the layers of docs/architecture.md (model/'s folders apart); an edge
A --> B says that some module of A imports one of B, labelled with how many imports do. Every
import counts, at module level or inside a function, as in tests/test_layers.py.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

PACKAGES = ("model", "pipeline")


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{a.name}" for a in node.names]
    return [name for name in found if name.split(".")[0] in PACKAGES]


def group(module: str, modules: set[str], detail: str | None) -> str:
    """The node a module belongs to: one of model/'s folders, or a pipeline layer.
    `detail`: a package whose modules are nodes of their own."""
    while module not in modules and "." in module:  # `from x import name`: name is no module
        module = module.rsplit(".", 1)[0]
    parts = module.split(".")
    if detail and (module == detail or module.startswith(detail + ".")):
        return module
    if module == "model.weights.official":  # its own layer: it maps weights onto the models
        return module
    if parts[0] == "model":
        return ".".join(parts[:2]) if len(parts) > 2 else "model"
    return ".".join(parts[:2])


def graph(root: Path, detail: str | None = None) -> Counter[tuple[str, str]]:
    files = [p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))]
    modules = {module_name(root, p) for p in files}
    edges: Counter[tuple[str, str]] = Counter()
    for path in files:
        source = group(module_name(root, path), modules, detail)
        for imported in imports(path):
            target = group(imported, modules, detail)
            if target != source:
                edges[source, target] += 1
    return edges


def mermaid(edges: Counter[tuple[str, str]]) -> str:
    def node(name: str) -> str:
        return name.replace(".", "_") + f'["{name}"]'

    lines = ["graph TD"]
    lines += [f"  {node(a)} -->|{n}| {node(b)}" for (a, b), n in sorted(edges.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--modules", default=None, help="a package drawn module by module")
    args = parser.parse_args()
    print(mermaid(graph(Path(args.root), args.modules)))


if __name__ == "__main__":
    main()
