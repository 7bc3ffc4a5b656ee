"""The package's house rules (issue 33): no import circle, imports inside functions counted, and no module over
400 lines."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "aace"


def module_name(path: Path) -> str:
    parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict:
    """{module: the aace modules it imports anywhere in its body}."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name, deps = module_name(path), set()
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" for a in node.names} if node.module is None else {target}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aace"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("aace")}
        graph[name] = deps
    return {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}


def cycles(graph: dict) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), the package itself left out: its
    __init__ re-exports the public names, and no module imports the package to reach them."""
    graph = {k: v - {"aace"} for k, v in graph.items() if k != "aace"}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_package():
    assert cycles(imports()) == []


def test_the_circle_finder_sees_a_circle():
    assert cycles({"aace.a": {"aace.b"}, "aace.b": {"aace.c"}, "aace.c": {"aace.a"}, "aace.d": set()}) == [
        ["aace.a", "aace.b", "aace.c"]]


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
