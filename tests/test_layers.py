"""The layering of omni's modules (docs/architecture.md, ../shared/DESIGN.md).

Every ``omni`` import, at module top or inside a function, must go down this order (or stay in
its own layer); omni imports inside functions are not allowed at all (they hid an import cycle;
a function may import an optional third-party package). The test parses every module with
``ast``, so it needs no imports of its own and sees imports that never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

OMNI = Path(__file__).resolve().parents[1] / "omni"

# Lowest first. A module is placed by its first name under omni (omni.model.backbone -> model),
# unless MODULE_LAYER places it on its own.
LAYERS = [
    {"io", "metrics", "vocab", "schema", "progress", "weights"},
    {"media"},
    {"tokenizers"},
    {"sequence"},
    {"model"},
    {"generation"},
    {"processor"},
    {"pipeline", "transcribe"},  # transcribe: Whisper long-form decoding, which Pipeline.transcribe calls
    {"data"},
    {"config"},  # recipes: validated against the model's and the data's registries
    {"train", "model_card"},  # the model card is written by the trainer
    {"eval"},
    {"api"},
    {"cli", "demo", "serve", "__main__", ""},  # "": omni/__init__.py, the public names
]

# Modules that sit in another layer than their package's, and why.
MODULE_LAYER = {
    # Pure torch building blocks (no omni imports): the video tower's temporal Q-Former is the
    # same module as the connector of that name, so the tokenizers layer may use them.
    "model.connectors": "tokenizers",
    # The audio-code layouts (delay, flatten) are how codes are laid out in a sequence: the
    # sequence renderer uses them, the model's heads read their vocabulary ranges.
    "model.audio_codes": "vocab",
    # Reading manifests (a JSONL, Parquet or Arrow file, or a glob of shards) is file I/O on omni.io
    # alone: the tokenizer trainer reads its corpus through it as the datasets do.
    "data.manifest": "io",
}

# Imports that go against the order on purpose, each with its reason (none today); the test
# fails when one of them is gone, so this set only shrinks.
KNOWN: set[tuple[str, str, str]] = set()


def layer_of(module: str) -> int:
    """``omni.model.backbone`` -> the index of its layer in LAYERS."""
    name = module.removeprefix("omni").removeprefix(".")
    for prefix, placed in MODULE_LAYER.items():
        if name == prefix or name.startswith(prefix + "."):
            name = placed
            break
    first = name.split(".")[0]
    for i, group in enumerate(LAYERS):
        if first in group:
            return i
    raise AssertionError(f"omni.{name}: not placed in LAYERS; add it with the layer it belongs to")


def module_name(path: Path) -> str:
    parts = path.relative_to(OMNI.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def omni_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for each omni import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "omni":  # from omni import media -> omni.media; from omni import Audio -> omni
                names = [
                    f"omni.{a.name}"
                    if (OMNI / a.name).exists() or (OMNI / f"{a.name}.py").exists()
                    else "omni"
                    for a in node.names
                ]
            elif node.module.startswith("omni."):
                names = [node.module]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name == "omni" or a.name.startswith("omni.")]
        else:
            continue
        found += [(name, id(node) in in_function, node.lineno) for name in names]
    return found


def all_imports() -> dict[str, list[tuple[str, bool, int]]]:
    return {module_name(p): omni_imports(p) for p in sorted(OMNI.rglob("*.py"))}


def violations() -> set[tuple[str, str, str]]:
    out = set()
    for module, imports in all_imports().items():
        for imported, inside, _ in imports:
            if imported == module or imported.startswith(module + ".") and not inside:
                continue  # a package's __init__ importing its own submodules
            if inside:
                out.add((module, imported, "inside a function"))
            elif layer_of(imported) > layer_of(module):
                out.add((module, imported, "up"))
    return out


def test_every_module_is_placed_in_a_layer():
    for module in all_imports():
        layer_of(module)


def test_no_import_goes_up_the_layers_or_hides_in_a_function():
    found = violations()
    new = sorted(found - KNOWN)
    assert not new, "imports against docs/architecture.md's layer order:\n" + "\n".join(
        f"  {m} imports {i} ({why})" for m, i, why in new
    )
    gone = sorted(KNOWN - found)
    assert not gone, "no longer found, remove them from KNOWN:\n" + "\n".join(f"  {v}" for v in gone)


def test_there_is_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for module, imports in all_imports().items():
        graph[module] = {i for i, _, _ in imports if i != module}
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
