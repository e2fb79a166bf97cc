"""Import direction (docs/design.md, "Who may import whom").

The kernel side (xdp/) owns its ABI and never imports the exporter; nothing in the product
(exporter/, xdp/, collectors/) imports tools/ or tests/. Every import counts, also those inside
functions, since they run too. Imports are read from the source (ast), so nothing is executed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("exporter", "xdp", "collectors")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import statement in `path`, relative ones resolved."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:   # `from exporter import cli` imports exporter.cli
                yield node.lineno, f"{name}.{alias.name}"


def sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def offending(files: list[Path], forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    bad = []
    for path in files:
        for line, name in imports(path, root):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return sorted(set(bad))


def test_the_kernel_side_never_imports_the_exporter() -> None:
    assert offending(sources("xdp"), ("exporter", "collectors", "tools", "tests")) == []


def test_the_collector_takes_only_the_address_grammar_from_the_exporter() -> None:
    """collectors/ is the independent decoder the interop tests hold the encoder to: of the exporter
    it may share only the HOST:PORT grammar (docs/design.md)."""
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in sources("collectors")
           for line, name in imports(p)
           if name.split(".")[0] in ("exporter", "xdp") and name not in ("exporter", "exporter.address")
           and not name.startswith("exporter.address.")]
    assert bad == []


def test_nothing_in_the_product_imports_tools_or_tests() -> None:
    assert offending(sources(*PRODUCT), ("tools", "tests")) == []


def product_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in sources(*PRODUCT)}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        graph[mod] = {name for _, name in imports(path) if name in files and name != mod}
    return graph


def test_no_two_product_modules_import_each_other() -> None:
    graph = product_graph()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert pairs == []


@pytest.mark.parametrize("forbidden", [("exporter",), ("tools",)])
def test_the_checks_see_an_offending_import(tmp_path: Path, forbidden: tuple[str, ...]) -> None:
    # The walker must find imports inside functions and `from x import y` forms, or the tests above
    # pass for the wrong reason.
    (tmp_path / "xdp").mkdir()
    src = tmp_path / "xdp" / "mod.py"
    src.write_text(f"def f():\n    from {forbidden[0]} import thing\n    return thing\n")
    assert offending([src], forbidden, tmp_path) == [f"xdp/mod.py:2 imports {forbidden[0]}",
                                                     f"xdp/mod.py:2 imports {forbidden[0]}.thing"]


def private_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    """`from m import _name` across modules: a private name used where it was not defined."""
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level:
                for alias in node.names:
                    # exporter._core is the compiled extension behind exporter/core.py, a module.
                    if alias.name.startswith("_") and not alias.name.startswith("__") \
                            and f"{node.module}.{alias.name}" != "exporter._core":
                        bad.append(f"{path.relative_to(root)}:{node.lineno} imports {node.module}.{alias.name}")
    return bad


def test_no_private_name_crosses_modules(tmp_path: Path) -> None:
    assert private_imports(sources(*PRODUCT, "tools")) == []
    probe = tmp_path / "mod.py"
    probe.write_text("def f():\n    from xdp.loader import _hidden\n")
    assert private_imports([probe], tmp_path) == ["mod.py:2 imports xdp.loader._hidden"]


def test_the_transport_knows_nothing_of_ipfix() -> None:
    # The encoder owns the wire format (templates, headers, their alignment to a queue); the
    # transport moves bytes and reports events.
    package = sorted((ROOT / "exporter" / "transport").glob("*.py"))
    assert package
    for transport in package:
        assert [name for _, name in imports(transport) if name.startswith("exporter.ipfix")] == []
        assert '"!HHIII"' not in transport.read_text()


def test_no_test_file_imports_another() -> None:
    # Shared test code lives in helper modules (tests/conftest.py, tests/kernel/harness.py,
    # tests/interop/collecting.py, tests/unit/wire.py, ...), not in another file's tests.
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in sources("tests") for line, name in imports(path)
           if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")
           and module_name(path) != name]
    assert bad == []
