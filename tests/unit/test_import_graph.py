"""No import circles inside the package, and every module imports on its own."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "vllm_router_svcdisc"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> set[str]:
    """The package's top-level modules this one imports anywhere (also under TYPE_CHECKING and
    inside functions: a circle there is still a circle for readers and type checkers)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and (node.module or "").startswith("vllm_router_svcdisc."):
                found.add((node.module or "").split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vllm_router_svcdisc."):
                    found.add(alias.name.split(".")[1])
    return {name for name in found if name in MODULES} - {module}


def _cycle() -> list[str] | None:
    graph = {module: _imports(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            cycle = visit(target, [*path, module])
            if cycle is not None:
                return cycle
        done.add(module)
        return None

    for module in MODULES:
        cycle = visit(module, [])
        if cycle is not None:
            return cycle
    return None


def test_the_scraper_and_telemetry_do_not_import_each_other() -> None:
    assert "telemetry" not in _imports("scraper")
    assert "metric_names" in _imports("scraper") and "metric_names" in _imports("telemetry")


def test_no_module_of_the_package_is_in_an_import_circle() -> None:
    assert _cycle() is None


@pytest.mark.parametrize("module", ["telemetry", "scraper", "discovery", "metric_names"])
def test_the_module_imports_in_a_fresh_interpreter(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import vllm_router_svcdisc.{module}"], check=True,
                   timeout=60)
