"""The registry of benchmarked attention implementations, in the order their rows are shown.

A new provider is a Provider subclass added with `register`.
"""

from __future__ import annotations

from sla2cli.bench.providers.base import DENSE, ROUTING, SPARSE, Provider, ProviderUnavailable
from sla2cli.bench.providers.dense import CudnnSdpa, DefaultSdpa, FlashAttnPackage, FlashSdpa, Sage
from sla2cli.bench.providers.sparse import Flex, Sla2, Sla2Lowbit, Sla2Routing
from sla2cli.errors import UserError

BASELINE = "fa2"  # speedups are relative to this provider

_REGISTRY: dict[str, Provider] = {}


def register(provider: Provider) -> None:
    """Add a provider; its name must be new."""
    if provider.name in _REGISTRY:
        raise ValueError(f"provider {provider.name!r} is registered twice")
    _REGISTRY[provider.name] = provider


for _provider in (
    FlashSdpa(), CudnnSdpa(), FlashAttnPackage(), DefaultSdpa(), Sage(), Flex(), Sla2(), Sla2Lowbit(),
    Sla2Routing(),
):
    register(_provider)


def provider_names() -> list[str]:
    return list(_REGISTRY)


def get_provider(name: str) -> Provider:
    """The provider called `name`; UserError naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise UserError(f"--provider {name!r} is unknown; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def select_providers(names: list[str] | None) -> list[Provider]:
    """The providers to run: all registered ones by default, else those named (registry order).

    Naming a provider whose package is not installed is a mistake the user can fix (install it or
    drop it), so it is an error; in the default run such providers just get a skipped row.
    """
    if not names:
        return list(_REGISTRY.values())
    chosen = [get_provider(name).name for name in dict.fromkeys(names)]
    for name in chosen:
        provider = _REGISTRY[name]
        if provider.not_installed() is not None:
            raise UserError(
                f"--provider {name} needs {provider.package}, which is not installed: "
                f"{provider.install_hint}, or drop --provider {name}"
            )
    return [provider for name, provider in _REGISTRY.items() if name in chosen]


__all__ = [
    "BASELINE",
    "DENSE",
    "ROUTING",
    "SPARSE",
    "Provider",
    "ProviderUnavailable",
    "get_provider",
    "provider_names",
    "register",
    "select_providers",
]
