"""The package's structure in numbers: import directions, circles, function-local imports.

    python benchmarks/structure.py [ROOT] [--json FILE]

ROOT is a checkout (default: this one); run it on an older commit's checkout to compare
(`git worktree add /tmp/before <commit> && python benchmarks/structure.py /tmp/before`).

Every module of `megatron_anchor` gets a layer (LAYERS, lowest first). An *up-arrow* is an
import, at module level or inside a function, of a module in a higher layer; a *cross*
import is one between two different packages of the tools' layer (e.g. `training` and
`evaluation`); a *circle* is a set of modules that import each other at run time (a strongly
connected component of the import graph; `if TYPE_CHECKING:` imports do not count). `cli`
sits on top: nothing below may import it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from collections import defaultdict

# (module prefix, layer); the longest matching prefix wins.
LAYERS = [
    ("megatron_anchor", 8),              # the package __init__: a facade re-exporting layout
    ("megatron_anchor.errors", 0),
    ("megatron_anchor.files", 0),
    ("megatron_anchor.layout", 1),
    ("megatron_anchor.rope", 1),
    ("megatron_anchor.runtime", 2),
    ("megatron_anchor.cpu", 2),
    ("megatron_anchor.data", 2),
    ("megatron_anchor.tooling", 3),
    ("megatron_anchor.attention", 3),
    ("megatron_anchor.backends", 3),
    ("megatron_anchor.spec", 3),
    ("megatron_anchor.model", 4),
    ("megatron_anchor.checkpoint", 5),
    ("megatron_anchor.parallel", 5),
    ("megatron_anchor.convert", 6),
    ("megatron_anchor.parallel.verify_parity", 7),
    ("megatron_anchor.diagnostics", 7),
    ("megatron_anchor.evaluation", 7),
    ("megatron_anchor.training", 7),
    ("megatron_anchor.testing", 7),
    # Entry points: the tools, and the module Megatron-LM's --spec imports.
    ("megatron_anchor.cli", 8),
    ("megatron_anchor.megatron_lm_spec", 8),
]
TOOL_LAYERS = (7,)  # packages of one layer here should not import each other


# Rules that should live in one place: a regular expression that finds a copy of each, and
# the files of the package that hold one.
RULES = {
    "the list of variants": r"[\"']intra-doc-reset[\"']",
    "a variant tested by name": r"variant\s*[!=]=\s*[\"']|[\"']full[\"']\s*[!=]=",
    "the anchor is BOS, else EOS": r"bos if .*bos is not None else",
    "CP chunks r and 2·CP-1-r": r"2 \* cp(_size)? - 1 - ",
    "a temporary file renamed": r"os\.replace\(",
    "a rank helper": r"dist\.get_rank\(\) if dist\.is_initialized\(\)|environ\.get\([\"']RANK",
    "a table of architecture flags": r"^(MODEL_FLAGS|ARCHITECTURE_FLAGS)\s*=",
    "architecture flags checked against a checkpoint": r"contradicts the checkpoint",
    "model_config.json read": r"MODEL_CONFIG_FILE\)|model_config\.json[\"']\)",
}


def rule_homes(found: dict) -> dict:
    homes = {}
    for rule, pattern in RULES.items():
        regex = re.compile(pattern, re.MULTILINE)
        homes[rule] = sorted(m for m, path in found.items()
                             if regex.search(open(path, encoding="utf-8").read()))
    return homes


def layer_of(module: str) -> tuple:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best], best


def modules(root: str) -> dict:
    """module name -> path, for every .py file of the package under `root`."""
    found = {}
    base = os.path.join(root, "megatron_anchor")
    for folder, _, names in os.walk(base):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def imports(path: str, module: str, known: set):
    """(imported module, function-local?) for every import of a package module in `path`;
    and the number of function-local imports of anything."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    # Imports for type checkers only are not edges of the running program.
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    top_level |= {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try))
                  for n in ast.walk(node)}
    found, local_count = [], 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        local = id(node) not in top_level
        local_count += local
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.append((name, local))
    return found, local_count


def circles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def measure(root: str) -> dict:
    found = modules(root)
    known = set(found)
    graph, up, cross, local_total, local_package = defaultdict(set), [], [], 0, 0
    for module, path in sorted(found.items()):
        edges, local_count = imports(path, module, known)
        local_total += local_count
        for target, local in edges:
            graph[module].add(target)
            local_package += local
            (src_layer, src_group), (dst_layer, dst_group) = layer_of(module), layer_of(target)
            edge = f"{module} -> {target}" + (" (in a function)" if local else "")
            if dst_layer > src_layer:
                up.append(edge)
            elif dst_layer == src_layer and src_layer in TOOL_LAYERS and \
                    src_group != dst_group and \
                    not target.startswith(src_group + "."):
                cross.append(edge)
    found_circles = circles(graph)
    return {"root": os.path.abspath(root), "modules": len(found),
            "lines": sum(sum(1 for _ in open(p, encoding="utf-8")) for p in found.values()),
            "up_arrows": sorted(set(up)), "cross_imports": sorted(set(cross)),
            "circles": found_circles, "function_local_imports": local_total,
            "function_local_package_imports": local_package,
            "library_imports_cli": sorted(e for e in set(up) if "-> megatron_anchor.cli" in e),
            "rules": rule_homes(found)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args(argv)
    result = measure(args.root)
    print(f"{result['modules']} modules, {result['lines']} lines under {result['root']}")
    for key in ("up_arrows", "cross_imports", "library_imports_cli"):
        print(f"{key}: {len(result[key])}")
        for edge in result[key]:
            print(f"  {edge}")
    print(f"circles: {len(result['circles'])}")
    for component in result["circles"]:
        print(f"  {' <-> '.join(component)}")
    print(f"function-local imports: {result['function_local_imports']} "
          f"({result['function_local_package_imports']} of megatron_anchor modules)")
    print("files holding each rule:")
    for rule, homes in result["rules"].items():
        print(f"  {len(homes):2d}  {rule}: {', '.join(h.replace('megatron_anchor.', '') for h in homes)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
