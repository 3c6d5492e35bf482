"""What a model provider is, and the registry that maps model names to providers.

A provider is any object with a `name`, an ``async list_models()`` and a
``stream(request)`` async generator of `Delta`. It may also have ``async
aclose()``, called at shutdown. The provider must let cancellation through: the
session cancels its scope on stop or disconnect, and the provider's generator is
closed right there (an upstream HTTP request is closed, a local generation loop
stops at its next token).
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Iterator, Protocol, runtime_checkable

import attrs

from .chat import ChatRequest, Delta
from .errors import ModelNotFound

log = logging.getLogger("streamvisor.providers")


@attrs.frozen
class ModelInfo:
    #: The name clients use.
    id: str
    #: The provider's name for the model, when it differs (an alias).
    target: str | None = None
    owned_by: str = "streamvisor"
    created: int = 0
    #: The tokens its context holds, prompt and answer together, when the
    #: provider knows (contract 1.5); None when it does not say.
    context_length: int | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}


@runtime_checkable
class Provider(Protocol):
    name: str

    async def list_models(self) -> list[ModelInfo]: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[Delta]: ...


@attrs.frozen
class Route:
    """Where a model name leads: a provider and the provider's own model name."""

    provider: Any
    model: ModelInfo

    @property
    def target(self) -> str:
        return self.model.target or self.model.id


class ProviderRegistry:
    """The registered providers and the model names they serve.

    Plugins use `resolve`, `models`, `get` and iteration (providers in
    registration order); the runtime registers, refreshes and closes them.
    """

    def __init__(self) -> None:
        self._providers: dict[str, Any] = {}
        self._routes: dict[str, Route] = {}
        #: Every model of every provider, shadowed ones too, for a pinned call.
        self._own: dict[str, dict[str, Route]] = {}

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._providers.values()))

    def __len__(self) -> int:
        return len(self._providers)

    def get(self, name: str) -> Any | None:
        """The provider registered under `name`, or None."""
        return self._providers.get(name)

    def register(self, provider: Any) -> None:
        """The ``register`` callback of the `register_providers` hook."""
        if not isinstance(provider, Provider):
            raise TypeError(f"{provider!r} is not a provider: it needs name, list_models() and stream(request)")
        if provider.name in self._providers:
            raise ValueError(f"a provider named {provider.name!r} is already registered")
        self._providers[provider.name] = provider

    async def refresh(self) -> None:
        """Ask every provider for its models; the first provider to claim a name wins."""
        routes: dict[str, Route] = {}
        own: dict[str, dict[str, Route]] = {}
        for provider in self._providers.values():
            mine = own.setdefault(provider.name, {})
            for model in await provider.list_models():
                mine.setdefault(model.id, Route(provider, model))
                if model.id in routes:
                    log.warning(
                        "model %r of provider %r is shadowed by provider %r",
                        model.id,
                        provider.name,
                        routes[model.id].provider.name,
                    )
                    continue
                routes[model.id] = Route(provider, model)
        self._routes = routes
        self._own = own

    def resolve(self, model: str, provider: str | None = None) -> Route:
        """Where `model` leads. With `provider` (contract 1.6, a request's
        pinned provider): that provider's model of that name (its `id`, else
        its `target`), even when another provider's model shadows the name."""
        if provider is not None:
            return self._pinned(model, provider)
        route = self._routes.get(model)
        if route is None:
            known = ", ".join(sorted(self._routes)) or "none are configured"
            raise ModelNotFound(f"The model '{model}' does not exist. Available models: {known}.", param="model")
        return route

    def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        """The provider's stream for `request`, as the end of the middleware
        chain calls it (1.6): routed by its model (and its pinned provider),
        at call time, the model renamed to the provider's own name for it."""
        route = self.resolve(request.model, request.provider)
        if route.target != request.model:
            request = attrs.evolve(request, model=route.target)
        return route.provider.stream(request)

    def _pinned(self, model: str, provider: str) -> Route:
        mine = self._own.get(provider)
        if mine is None:
            raise ModelNotFound(f"No provider is named '{provider}'.", param="model")
        route = mine.get(model) or next((r for r in mine.values() if r.target == model), None)
        if route is None:
            known = ", ".join(sorted(mine)) or "none"
            raise ModelNotFound(f"Provider '{provider}' does not serve the model '{model}'. Its models: {known}.", param="model")
        return route

    def models(self) -> list[ModelInfo]:
        """Every model name clients may use, in the order providers listed them."""
        return [route.model for route in self._routes.values()]

    def models_of(self, provider: str) -> list[ModelInfo]:
        """The model names one provider serves."""
        return [route.model for route in self._routes.values() if route.provider.name == provider]

    async def aclose(self) -> None:
        for provider in self._providers.values():
            close = getattr(provider, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("provider %r failed to close", provider.name)
