"""Contract 1.2 as a third party writes against it: authenticators, gates and
price functions, including the ones that misbehave."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from streamvisor.hooks import Admission, APIError, Principal, bearer_token, hookimpl

from .conftest import SCRIPTED, start_server

HI = [{"role": "user", "content": "hi"}]


class Plugin:
    """One authenticator, one gate and one price function, each told by the
    test what to do."""

    def __init__(self) -> None:
        self.authenticate_does = "vouch"
        self.gate_does = "admit"
        self.price_does = "price"
        self.released: list[str] = []
        self.admitted: list[str] = []

    @hookimpl
    def register_authenticators(self, register):
        def authenticate(headers, path):
            token = bearer_token(headers)
            if token != "tok-ok":
                return None
            if self.authenticate_does == "raise":
                raise RuntimeError("the directory is down")
            if self.authenticate_does == "garbage":
                return "alice"
            return Principal(identity="alice", team="red")

        register(authenticate)

    @hookimpl
    def register_gates(self, register):
        async def gate(request, principal):
            if self.gate_does == "raise":
                raise KeyError("a bug")
            if self.gate_does == "garbage":
                return {"headers": {}}
            self.admitted.append(request.session_id)
            return Admission(headers={"X-Quota-Left": "7"}, release=lambda: self.released.append(request.session_id))

        register(gate)

    @hookimpl
    def register_pricing(self, register):
        def price(model, usage, session):
            if self.price_does == "raise":
                raise ZeroDivisionError("no price")
            if self.price_does == "nan":
                return float("nan")
            return usage.total_tokens * 0.5

        register(price)


class Refuser:
    """A second gate, after the first: refuses every request."""

    @hookimpl
    def register_gates(self, register):
        def gate(request, principal):
            raise APIError("Not today.", status=429, type="requests", code="rate_limit_exceeded", headers={"Retry-After": "3"})

        register(gate)


@pytest.fixture
def plugin():
    return Plugin()


def serve(plugin, *extra: str, **plugins):
    toml = SCRIPTED + "\n[plugins.third]\n" + "".join(f"\n[plugins.{name}]\n" for name in extra)
    return start_server(toml, plugins={"third": plugin, **plugins})


def test_an_authenticated_session_carries_the_principal_and_the_gates_headers_and_price(plugin):
    with serve(plugin) as server:
        client = server.openai(api_key="tok-ok")
        raw = client.chat.completions.with_raw_response.create(model="fox", messages=HI)
        assert raw.headers["X-Quota-Left"] == "7"
        answer = raw.parse()
        session = server.runtime.sessions.get(raw.headers["X-Session-ID"])
        assert (session.identity, session.team, session.key_id) == ("alice", "red", None)
        assert answer.usage.model_extra["cost_usd"] == answer.usage.total_tokens * 0.5
        assert plugin.admitted == [session.id] and plugin.released == []
        # Nobody vouches for another token: 401, before any gate.
        with pytest.raises(openai.AuthenticationError):
            server.openai(api_key="tok-other").chat.completions.create(model="fox", messages=HI)
        assert len(plugin.admitted) == 1


def test_a_later_gates_refusal_releases_the_earlier_admission_and_keeps_its_headers(plugin):
    with serve(plugin, "refuser", refuser=Refuser) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "fox", "messages": HI}, headers={"Authorization": "Bearer tok-ok"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "3" and r.headers["X-Quota-Left"] == "7"
        assert plugin.released == plugin.admitted and len(plugin.released) == 1
        assert server.runtime.sessions.live_count == 0 and len(server.runtime.sessions) == 0  # no session was made


@pytest.mark.parametrize("where,does", [("authenticate_does", "raise"), ("authenticate_does", "garbage"), ("gate_does", "raise"), ("gate_does", "garbage")])
def test_a_misbehaving_authenticator_or_gate_is_a_500_and_a_fault_of_its_plugin(plugin, where, does):
    setattr(plugin, where, does)
    with serve(plugin) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "fox", "messages": HI}, headers={"Authorization": "Bearer tok-ok"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert server.runtime.faults.total("third") == 1
        assert len(server.runtime.sessions) == 0


@pytest.mark.parametrize("does", ["raise", "nan"])
def test_a_price_function_that_fails_prices_nothing_and_the_stream_is_unharmed(plugin, does):
    plugin.price_does = does
    with serve(plugin) as server:
        chunks = list(
            server.openai(api_key="tok-ok").chat.completions.create(
                model="fox", messages=HI, stream=True, stream_options={"include_usage": True}
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("The quick")
        assert "cost_usd" not in (chunks[-1].usage.model_extra or {})
        deadline = time.monotonic() + 2
        while server.runtime.faults.total("third") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
