"""The pricing plugin against real servers: what a client sees of a session's
cost (the stream's usage chunk, the completion, the session object, /v1/usage),
the price table's lookups (exact, an alias's target, patterns in order, the
packaged list prices), cache hits, unpriced models and bad settings."""

from __future__ import annotations

import time

import pytest

from streamvisor.hooks import ConfigError, Delta, ModelInfo, Usage, hookimpl, unwrap

from .conftest import SCRIPTED, ServerThread, make_config, start_server

#: What every model of the metered provider reports: 400 of the 1000 prompt
#: tokens from the provider's prompt cache, 50 of the 200 completion tokens reasoning.
METERED = Usage(prompt_tokens=1000, completion_tokens=200, reasoning_tokens=50, cached_tokens=400)


class MeteredProvider:
    name = "metered"

    async def list_models(self):
        return [
            ModelInfo("metered"),
            ModelInfo("nickname", target="metered-v2"),
            ModelInfo("pat-special-1"),
            ModelInfo("pat-other"),
            ModelInfo("gpt-4o-mini-2024-07-18"),
            ModelInfo("gemma-3-270m"),
            ModelInfo("mystery"),
        ]

    async def stream(self, request):
        yield Delta(content="counted", usage=METERED)
        yield Delta(finish_reason="stop")


class MeteredPlugin:
    @hookimpl
    def register_providers(self, register):
        register(MeteredProvider())


PRICES = """
[plugins.pricing.prices.fox]
input = 2.0
output = 8.0

[plugins.pricing.prices.metered]
input = 2.0
output = 8.0
cached = 0.5
reasoning = 10.0

[plugins.pricing.prices."metered-v2"]
input = 3.0
output = 3.0

[plugins.pricing.prices."pat-special-*"]
input = 5.0
output = 5.0

[plugins.pricing.prices."pat-*"]
input = 7.0
output = 7.0
"""


def _server(pricing: str = PRICES, extra: str = "", **server):
    toml = SCRIPTED + "\n[plugins.metered]\n" + extra + "\n[plugins.pricing]\n" + pricing + "\n[plugins.usage]\n"
    return start_server(toml, plugins={"metered": MeteredPlugin}, **server)


def _session(server: ServerThread, session_id: str) -> dict:
    with server.http() as http:
        return http.get(f"/v1/sessions/{session_id}").json()


def _usage(server: ServerThread, **params) -> dict:
    with server.http() as http:
        response = http.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_recorded(server: ServerThread, sessions: int) -> None:
    """The usage listener records a session just after it ends: ask until it has."""
    deadline = time.monotonic() + 5
    while _usage(server)["totals"]["sessions"] < sessions:
        assert time.monotonic() < deadline, "the ledger did not record the sessions"
        time.sleep(0.01)


def _ask(client, model: str, content: str = "one two three") -> tuple[str, object]:
    """A non-streaming completion: (session id, its usage)."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": content}])
    return raw.headers["x-session-id"], raw.parse().usage


def test_the_usage_chunk_of_a_stream_carries_the_cost_at_the_tables_rates():
    with _server() as server:
        client = server.openai()
        raw = client.chat.completions.with_raw_response.create(
            model="fox", messages=[{"role": "user", "content": "one two three"}], stream=True, stream_options={"include_usage": True}
        )
        usage = [chunk.usage for chunk in raw.parse() if chunk.usage is not None][-1]
        # 3 prompt words at $2 per million, 9 completion words at $8 per million.
        assert (usage.prompt_tokens, usage.completion_tokens) == (3, 9)
        expected = (3 * 2.0 + 9 * 8.0) / 1e6
        assert usage.model_extra["cost_usd"] == pytest.approx(expected, rel=1e-9)
        # The session object says the same, and so does a non-streaming completion.
        session = _session(server, raw.headers["x-session-id"])
        assert session["usage"]["cost_usd"] == pytest.approx(expected, rel=1e-9)
        _, plain = _ask(client, "fox")
        assert plain.model_extra["cost_usd"] == pytest.approx(expected, rel=1e-9)
        # The ledger sums it, in the totals and in every breakdown.
        _wait_recorded(server, 2)
        body = _usage(server)
        assert body["totals"]["cost_usd"] == pytest.approx(2 * expected, rel=1e-6)
        assert body["by_model"]["fox"]["cost_usd"] == pytest.approx(2 * expected, rel=1e-6)
        assert body["by_provider"]["scripted"]["cost_usd"] == pytest.approx(2 * expected, rel=1e-6)
        assert body["by_identity"]["anonymous"]["cost_usd"] == pytest.approx(2 * expected, rel=1e-6)
        with server.http() as http:
            records = http.get("/v1/usage/sessions").json()["data"]
        assert [r["cost_usd"] for r in records] == [pytest.approx(expected, rel=1e-9)] * 2


def test_cached_and_reasoning_tokens_have_their_own_prices_and_unset_ones_default():
    with _server() as server:
        client = server.openai()
        _, metered = _ask(client, "metered")
        # 600 uncached prompt tokens at $2, 400 cached at $0.5, 150 output at $8, 50 reasoning at $10.
        assert metered.model_extra["cost_usd"] == pytest.approx((600 * 2 + 400 * 0.5 + 150 * 8 + 50 * 10) / 1e6, rel=1e-9)
        assert metered.prompt_tokens_details.cached_tokens == 400
        # An alias is priced by the provider's own name for it; its table has
        # no cached or reasoning price, so those are the input and output prices.
        session_id, nickname = _ask(client, "nickname")
        assert nickname.model_extra["cost_usd"] == pytest.approx((1000 * 3 + 200 * 3) / 1e6, rel=1e-9)
        assert _session(server, session_id)["model"] == "nickname"
        # Patterns are tried in order: the specific one first.
        assert _ask(client, "pat-special-1")[1].model_extra["cost_usd"] == pytest.approx(1200 * 5 / 1e6, rel=1e-9)
        assert _ask(client, "pat-other")[1].model_extra["cost_usd"] == pytest.approx(1200 * 7 / 1e6, rel=1e-9)


def test_the_packaged_table_prices_hosted_models_and_local_ones_at_zero():
    with _server(pricing="") as server:
        client = server.openai()
        # A dated snapshot matches its family's pattern: gpt-4o-mini's list
        # price, $0.15 input, $0.075 cached input and $0.60 output per million.
        _, mini = _ask(client, "gpt-4o-mini-2024-07-18")
        assert mini.model_extra["cost_usd"] == pytest.approx((600 * 0.15 + 400 * 0.075 + 200 * 0.60) / 1e6, rel=1e-9)
        _, local = _ask(client, "gemma-3-270m")
        assert local.model_extra["cost_usd"] == 0
        panel = server.run(server.runtime.status_panels)["pricing"]["prices"]
        assert panel["source"] == "the packaged prices.toml" and panel["models"] > 20 and panel["patterns"] > 10


def test_an_unpriced_model_costs_null_and_the_panel_names_it():
    with _server() as server:
        client = server.openai()
        session_id, usage = _ask(client, "mystery")
        assert "cost_usd" not in usage.model_extra  # OpenAI's usage object, unchanged
        assert _session(server, session_id)["usage"]["cost_usd"] is None
        _ask(client, "fox")
        _wait_recorded(server, 2)
        body = _usage(server)
        # A session without a price adds nothing to the sums.
        assert body["by_model"]["mystery"]["cost_usd"] == 0
        assert body["totals"]["cost_usd"] == pytest.approx(78 / 1e6, rel=1e-6)
        with server.http() as http:
            records = {r["model"]: r for r in http.get("/v1/usage/sessions").json()["data"]}
        assert records["mystery"]["cost_usd"] is None
        panel = server.run(server.runtime.status_panels)["pricing"]["prices"]
        assert panel["unpriced_models"] == {"mystery": 1}
        assert panel["unpriced_sessions"] == 1 and panel["priced_sessions"] == 1


def test_default_price_prices_what_the_table_does_not_have():
    pricing = "[plugins.pricing.default_price]\ninput = 1.0\noutput = 1.0\n"
    with _server(pricing) as server:
        _, usage = _ask(server.openai(), "mystery")
        assert usage.model_extra["cost_usd"] == pytest.approx(1200 / 1e6, rel=1e-9)


def test_a_cache_hit_is_charged_the_cache_hit_fraction():
    cache = '\n[plugins.cache]\nbackend = "memory"\n'
    with _server("cache_hit_fraction = 0.25\n" + PRICES, extra=cache) as server:
        client = server.openai()
        ids, costs, caches = [], [], []
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model="fox", messages=[{"role": "user", "content": "one two three"}], temperature=0
            )
            ids.append(raw.headers["x-session-id"])
            caches.append(raw.headers["x-cache"])
            costs.append(raw.parse().usage.model_extra["cost_usd"])
        full = (3 * 2.0 + 9 * 8.0) / 1e6
        assert caches == ["miss", "hit"]
        assert costs == [pytest.approx(full, rel=1e-9), pytest.approx(0.25 * full, rel=1e-9)]
        assert _session(server, ids[1])["usage"]["cost_usd"] == pytest.approx(0.25 * full, rel=1e-9)
        panel = server.run(server.runtime.status_panels)["pricing"]["prices"]
        assert panel["cache_hit_sessions"] == 1


def test_a_prices_file_relative_to_plugins_toml_overridden_by_plugins_toml(tmp_path):
    (tmp_path / "my-prices.toml").write_text('[prices.fox]\ninput = 100.0\noutput = 100.0\n\n[prices.echo]\ninput = 1.0\noutput = 1.0\n')
    toml = SCRIPTED + '\n[plugins.pricing]\nprices_file = "my-prices.toml"\n[plugins.pricing.prices.echo]\ninput = 4.0\noutput = 4.0\n'
    server = ServerThread(make_config(toml, source=str(tmp_path / "plugins.toml"))).start()
    try:
        client = server.openai()
        assert _ask(client, "fox")[1].model_extra["cost_usd"] == pytest.approx(12 * 100 / 1e6, rel=1e-9)
        assert _ask(client, "echo", "a b")[1].model_extra["cost_usd"] == pytest.approx(4 * 4 / 1e6, rel=1e-9)
        # The packaged table is not used: gemma-3-270m is in it, not in this file.
        panel = server.run(server.runtime.status_panels)["pricing"]["prices"]
        assert panel["source"] == str(tmp_path / "my-prices.toml") and panel["models"] == 2
    finally:
        server.stop()


BAD = [
    ("cache_hit_fraction = 1.5", "plugins.pricing", "cache_hit_fraction must be from 0 to 1"),
    ('prices_file = "nowhere.toml"', "plugins.pricing.prices_file", "a readable price file"),
    ("[plugins.pricing.prices.fox]\ninput = 1.0", "plugins.pricing.prices.fox.output", "nothing (it is required)"),
    ("[plugins.pricing.prices.fox]\ninput = -1.0\noutput = 1.0", "plugins.pricing.prices.fox", "input must be a number >= 0"),
    ("[plugins.pricing.prices.fox]\ninput = 1.0\noutput = 1.0\ncahced = 0.5", "plugins.pricing.prices.fox.cahced", "an unknown key"),
    ('[plugins.pricing.prices.fox]\ninput = "cheap"\noutput = 1.0', "plugins.pricing.prices.fox.input", "a number"),
]


@pytest.mark.parametrize("setting, key, says", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_settings_stop_start_up_naming_the_key(tmp_path, setting, key, says):
    toml = SCRIPTED + "\n[plugins.pricing]\n" + setting + "\n"
    thread = ServerThread(make_config(toml, source=str(tmp_path / "plugins.toml")))
    with pytest.raises(RuntimeError):
        thread.start()
    error = unwrap(thread.error)
    assert isinstance(error, ConfigError), repr(thread.error)
    assert f": {key}:" in str(error) and says in str(error), str(error)


def test_a_bad_prices_file_names_the_file_and_the_entry(tmp_path):
    (tmp_path / "prices.toml").write_text('[prices."gpt-x"]\ninput = 1.0\noutput = -2.0\n')
    toml = SCRIPTED + '\n[plugins.pricing]\nprices_file = "prices.toml"\n'
    thread = ServerThread(make_config(toml, source=str(tmp_path / "plugins.toml")))
    with pytest.raises(RuntimeError):
        thread.start()
    error = unwrap(thread.error)
    assert isinstance(error, ConfigError), repr(thread.error)
    assert str(error).startswith(f"{tmp_path / 'prices.toml'}: prices.\"gpt-x\".output: expected a number >= 0"), str(error)
