"""The public names import from the package root; the docs import nothing else."""

import importlib
import pathlib
import re

import vllm_router_svcdisc

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: modules the docs may import from besides the root: the simulator (tests, demos) and the
#: production-stack entry points
DOCUMENTED_MODULES = ("vllm_router_svcdisc.sim", "vllm_router_svcdisc.compat",
                      "vllm_router_svcdisc.prodstack")
FROM_IMPORT = re.compile(r"^\s*from\s+(vllm_router_svcdisc[\w.]*)\s+import\s+(\([^)]*\)|.+)$",
                         re.MULTILINE)
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


def _doc_imports() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in CODE_BLOCK.findall(doc.read_text(encoding="utf-8")):
            for module, names in FROM_IMPORT.findall(block):
                cleaned = re.sub(r"#[^\n]*", "", names).strip("() \n")
                names_only = [n.split(" as ")[0].strip() for n in cleaned.split(",")]
                found.append((doc.name, module, [n for n in names_only if n]))
    return found


def test_the_root_exports_exactly_all() -> None:
    public = {name for name in vars(vllm_router_svcdisc) if not name.startswith("_")}
    modules = {name for name in public
               if type(getattr(vllm_router_svcdisc, name)).__name__ == "module"}
    assert public - modules == set(vllm_router_svcdisc.__all__)
    assert len(set(vllm_router_svcdisc.__all__)) == len(vllm_router_svcdisc.__all__)
    for name in vllm_router_svcdisc.__all__:
        assert getattr(vllm_router_svcdisc, name) is not None


def test_the_contract_names_import_from_the_package_root() -> None:
    from vllm_router_svcdisc import (  # noqa: F401
        EndpointInfo,
        EngineStats,
        EngineStatsScraper,
        K8sServiceDiscovery,
        ModelInfo,
    )

    assert {"EndpointInfo", "EngineStats", "EngineStatsScraper", "K8sServiceDiscovery",
            "ModelInfo", "SvcDiscError", "InformerConfig", "ProbeConfig", "ScrapeConfig",
            "OutlierConfig", "BackoffPolicy", "DiscoveryConfigError", "Health",
            "register_metrics", "serve_metrics", "load_api_client",
            } <= set(vllm_router_svcdisc.__all__)


def test_every_name_the_docs_import_from_the_root_is_exported() -> None:
    imports = _doc_imports()
    assert any(module == "vllm_router_svcdisc" for _, module, _ in imports)  # the scan works
    for doc, module, names in imports:
        if module == "vllm_router_svcdisc":
            for name in names:
                assert name in vllm_router_svcdisc.__all__ or name in ("compat", "sim"), (doc, name)


def test_the_docs_import_no_internal_module() -> None:
    for doc, module, _ in _doc_imports():
        if module != "vllm_router_svcdisc":
            assert module.startswith(DOCUMENTED_MODULES), (doc, module)


def test_the_old_submodule_paths_still_import() -> None:
    for module, name in [("discovery", "DiscoveryConfigError"), ("discovery", "Health"),
                         ("discovery", "load_api_client"), ("informer", "InformerConfig"),
                         ("probe", "ProbeConfig"), ("scraper", "ScrapeConfig"),
                         ("outliers", "OutlierConfig"), ("telemetry", "register_metrics"),
                         ("telemetry", "serve_metrics"), ("telemetry", "DiscoveryCollector"),
                         ("backoff", "BackoffPolicy"), ("clock", "FakeClock"),
                         ("errors", "SvcDiscError")]:
        imported = getattr(importlib.import_module(f"vllm_router_svcdisc.{module}"), name)
        assert imported is getattr(vllm_router_svcdisc, name)


def test_the_readme_example_names_resolve() -> None:
    readme_import = "from vllm_router_svcdisc import K8sServiceDiscovery, EngineStatsScraper"
    exec(readme_import, {})  # the README's first line of code must not raise


def test_every_other_module_says_it_is_internal() -> None:
    package = ROOT / "vllm_router_svcdisc"
    public_modules = {"__init__", "__main__", "compat", "prodstack"}
    for source in sorted(package.glob("*.py")):
        if source.stem in public_modules:
            continue
        module = importlib.import_module(f"vllm_router_svcdisc.{source.stem}")
        assert (module.__doc__ or "").startswith("Internal:"), source.name
