"""The public names of the API contract import from the package root, and nothing else."""

import vllm_router_svcdisc


def test_the_contract_names_import_from_the_package_root() -> None:
    from vllm_router_svcdisc import (  # noqa: F401
        EndpointInfo,
        EngineStats,
        EngineStatsScraper,
        K8sServiceDiscovery,
        ModelInfo,
    )

    assert sorted(vllm_router_svcdisc.__all__) == [
        "EndpointInfo", "EngineStats", "EngineStatsScraper", "K8sServiceDiscovery", "ModelInfo",
        "SvcDiscError"]


def test_the_readme_example_names_resolve() -> None:
    readme_import = "from vllm_router_svcdisc import K8sServiceDiscovery, EngineStatsScraper"
    exec(readme_import, {})  # the README's first line of code must not raise
