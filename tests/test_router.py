"""The router plugin against two fake OpenAI-compatible upstreams on loopback,
both listing the same model `m1` (the router pins the provider): the latency
strategy learns the faster one and notices a recovery, hedging cuts the tail
of time to first token and closes every losing connection, least_busy keeps
in-flight counts even, failover and the retry plugin's circuit take a failing
deployment out of the rotation, and the cost, weighted and max_concurrent rules."""

from __future__ import annotations

import random
import statistics
import threading
import time
from typing import Any, Iterator

import httpx
import pytest

from streamvisor.config.errors import ConfigError
from streamvisor.hooks import PluginHost, unwrap
from streamvisor.testing import FakeUpstream, Reply, completion_events

from .conftest import ServerThread, make_config

KEY = "router-admin-key"


def upstreams_toml(**fakes: FakeUpstream) -> str:
    parts = ["[plugins.openai]"]
    for name, fake in fakes.items():
        parts.append(f'[[plugins.openai.upstreams]]\nname = "{name}"\nbase_url = "{fake.url}"\nmodels = ["m1"]\nread_timeout = 10')
    return "\n".join(parts) + "\n"


def deployments(*names: str) -> str:
    """Each named upstream's m1 as a deployment."""
    return "deployments = [" + ", ".join(f'{{ provider = "{name}", model = "m1" }}' for name in names) + "]\n"


@pytest.fixture
def fakes() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with FakeUpstream(models=["m1"]) as a, FakeUpstream(models=["m1"]) as b:
        a.reply(Reply(chunks=completion_events("alpha says hello")))
        b.reply(Reply(chunks=completion_events("bravo says hello")))
        yield a, b


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", KEY)
    return KEY


def serve(toml: str) -> ServerThread:
    return ServerThread(make_config(toml)).start()


def router_state(server: ServerThread) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/admin/router", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll `predicate` from the test's thread (it may call the server)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def deployment(state: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    return next(d for d in state["models"][model]["deployments"] if d["name"] == name)


def ask(client: httpx.Client, model: str = "smart") -> tuple[str, str]:
    """One streamed chat: (the deployment that served it, the text)."""
    with client.stream("POST", "/v1/chat/completions", json={"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.status_code == 200, response.read()
        body = response.read().decode()
        routed = response.headers["X-Routed-To"]
    text = "".join(_contents(body))
    return routed, text


def _contents(body: str) -> Iterator[str]:
    import json

    for line in body.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    yield content


def test_latency_learns_the_fast_deployment_and_notices_when_the_slow_one_recovers(fakes, admin):
    fast, slow = fakes
    fast.delay, slow.delay = 0.015, 0.15  # ten times slower to the first token
    toml = upstreams_toml(fast=fast, slow=slow) + (
        "[plugins.router]\nseed = 7\nexplore = 0.05\nalpha = 0.5\nlatency_tokens = 0\n"
        "[plugins.router.models.smart]\nstrategy = \"latency\"\n" + deployments("fast", "slow")
    )
    server = serve(toml)
    try:
        with server.http() as client:
            for _ in range(10):  # warm-up: each is measured
                ask(client)
            served = [ask(client)[0] for _ in range(100)]
            print(f"{served.count('fast/m1')} of 100 to the fast deployment")
            assert served.count("fast/m1") >= 90, served.count("fast/m1")
            state = router_state(server)
            assert deployment(state, "smart", "fast/m1")["ttft_ms"] < deployment(state, "smart", "slow/m1")["ttft_ms"] / 2

            slow.delay = 0.015  # the slow one recovers
            recovered_after = None
            window: list[str] = []
            for count in range(1, 301):
                window = (window + [ask(client)[0]])[-40:]
                if len(window) == 40 and window.count("slow/m1") >= 10:
                    recovered_after = count
                    break
            assert recovered_after is not None, "the recovered deployment never got a quarter of the traffic back"
            print(f"traffic came back after {recovered_after} requests")
    finally:
        server.stop()


def test_hedging_cuts_the_tail_closes_every_loser_and_never_mixes_output(fakes, admin, tmp_path):
    stalling, steady = fakes
    rng = random.Random(3)
    stalls = []

    def sometimes_stall(body: Any) -> Reply:
        stall = rng.random() < 0.2
        stalls.append(stall)
        return Reply(chunks=completion_events("alpha says hello"), delay=2.0 if stall else 0.0)

    stalling.choose(sometimes_stall)
    toml = upstreams_toml(a=stalling, b=steady) + (
        f'[plugins.store]\nurl = "sqlite:///{tmp_path}/store.db"\n'
        "[plugins.router]\nseed = 11\nhedge_max_share = 0.5\nhedge_burst = 50\n"
        "[plugins.router.models.smart]\nstrategy = \"weighted\"\nhedge_after_ms = 200\n" + deployments("a", "b")
    )
    server = serve(toml)
    try:
        client = server.openai(max_retries=0)
        ttfts = []
        for _ in range(100):
            started = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(model="smart", stream=True, messages=[{"role": "user", "content": "hi"}])
            first = None
            text = ""
            for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - started
                    text += chunk.choices[0].delta.content
            ttfts.append(first)
            routed = raw.headers["X-Routed-To"]
            assert text == {"a/m1": "alpha says hello", "b/m1": "bravo says hello"}[routed], (routed, text)
        ttfts.sort()
        p99 = ttfts[98]
        print(f"time to first token: p50 {statistics.median(ttfts) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {ttfts[-1] * 1000:.0f} ms")
        assert p99 < 0.3

        state = router_state(server)
        a, b = deployment(state, "smart", "a/m1"), deployment(state, "smart", "b/m1")
        stalled = sum(stalls)
        assert stalled >= 5  # the seed makes enough of them
        # Every stall lost its race (a loaded machine may hedge a request that
        # was merely slow, too), every race had one loser, and every loser's
        # connection was cut at once (the fake saw its client leave mid-wait).
        lost_a, lost_b = a["hedges"]["lost"], b["hedges"]["lost"]
        assert lost_a >= stalled
        assert lost_a + lost_b == state["hedging"]["hedged"] == a["hedges"]["won"] + b["hedges"]["won"]
        for fake, lost in ((stalling, lost_a), (steady, lost_b)):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sum(1 for r in fake.connection_log if r.cut) < lost:
                time.sleep(0.02)
            cut = [r for r in fake.connection_log if r.cut]
            assert len(cut) == lost and all(r.closed is not None for r in cut)
        assert a["in_flight"] == b["in_flight"] == 0
        # What the losers spent is recorded: the winner's prompt (1 token from the fake) each.
        assert a["hedge_losses"]["prompt_tokens"] == lost_a
        store = server.runtime.store
        month = time.strftime("%Y-%m", time.gmtime())
        until(lambda: server.run(store.amount, "router:hedge_lost:tokens", "a/m1", month) == lost_a)
    finally:
        server.stop()


def test_least_busy_keeps_in_flight_counts_within_one(fakes, admin):
    a, b = fakes
    for fake, word in ((a, "alpha"), (b, "bravo")):
        fake.reply(Reply(chunks=completion_events(" ".join([word] * 20)), chunk_delay=0.02))
    toml = upstreams_toml(a=a, b=b) + "[plugins.router]\n[plugins.router.models.smart]\nstrategy = \"least_busy\"\n" + deployments("a", "b")
    server = serve(toml)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            state = router_state(server)["models"]["smart"]["deployments"]
            counts = [d["in_flight"] for d in state]
            if sum(counts) >= 16:  # under load, not while it winds up or down
                samples.append(abs(counts[0] - counts[1]))
            time.sleep(0.01)

    def client_loop() -> None:
        with server.http() as client:
            for _ in range(8):
                ask(client)

    try:
        sampler = threading.Thread(target=sample)
        sampler.start()
        workers = [threading.Thread(target=client_loop) for _ in range(32)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        sampler.join()
        assert len(samples) >= 10, samples
        within = sum(1 for d in samples if d <= 1) / len(samples)
        print(f"{len(samples)} samples, {within:.0%} within 1, largest gap {max(samples)}")
        # Each pick goes to the less busy one (the test below checks every
        # pick); the gap opens only when streams end on one side between two
        # picks, in bursts the router does not control (more on a loaded
        # machine, whose clients come back later), so the largest gap is not
        # the router's to bound. Weighted random at 32 in flight would be
        # within 1 in about one sample in seven.
        assert within >= 0.8
        state = router_state(server)["models"]["smart"]["deployments"]
        assert abs(state[0]["requests"] - state[1]["requests"]) <= 8
    finally:
        server.stop()


def test_a_failing_deployment_fails_over_then_leaves_the_rotation_and_comes_back(fakes, admin):
    broken, good = fakes
    broken.respond(503, b'{"error": {"message": "down"}}', {"Content-Type": "application/json"})
    toml = upstreams_toml(broken=broken, good=good) + (
        "[plugins.router]\neject_after = 2\neject_seconds = 1.5\n"
        "[plugins.router.models.smart]\nstrategy = \"weighted\"\n" + deployments("broken", "good")
        + "[plugins.retry]\nattempts = 1\n[plugins.retry.circuit]\nfailures = 100\n"
    )
    server = serve(toml)
    try:
        with server.http() as client:
            results = [ask(client) for _ in range(20)]
            assert all(text == "bravo says hello" and routed == "good/m1" for routed, text in results)
            # Two failures in a row take it out: the broken one was called twice, not ~10 times.
            assert broken.posts == 2
            state = router_state(server)
            assert deployment(state, "smart", "broken/m1")["failures"] == 2
            assert state["failovers"] == 2
            time.sleep(1.6)  # the ejection ends; the upstream has recovered
            broken.reply(Reply(chunks=completion_events("alpha says hello")))
            served = {ask(client)[0] for _ in range(20)}
            assert served == {"broken/m1", "good/m1"}
    finally:
        server.stop()


def test_an_open_circuit_takes_the_deployment_out_for_its_cooldown(fakes, admin):
    broken, good = fakes
    broken.respond(502, b'{"error": {"message": "bad gateway"}}', {"Content-Type": "application/json"})
    toml = upstreams_toml(broken=broken, good=good) + (
        "[plugins.router]\neject_after = 100\n"
        "[plugins.router.models.smart]\nstrategy = \"weighted\"\n" + deployments("broken", "good")
        + "[plugins.retry]\nattempts = 1\n[plugins.retry.circuit]\nfailures = 1\ncooldown = 30\n"
    )
    server = serve(toml)
    try:
        with server.http() as client:
            assert all(ask(client)[0] == "good/m1" for _ in range(20))
            # One real failure opened its circuit; at most one more call learned
            # of it (a fast 503 circuit_open); then it is out of the rotation.
            assert broken.posts == 1
            broken_state = deployment(router_state(server), "smart", "broken/m1")
            assert broken_state["ejected_reason"] == "its circuit is open" and broken_state["ejected_for_seconds"] > 20
    finally:
        server.stop()


def test_cost_picks_the_cheapest_until_it_is_full(fakes, admin):
    cheap, dear = fakes
    cheap.reply(Reply(chunks=completion_events("alpha says hello"), delay=0.3))
    toml = upstreams_toml(cheap=cheap, dear=dear) + (
        "[plugins.router]\n[plugins.router.models.smart]\nstrategy = \"cost\"\n"
        'deployments = [{ provider = "cheap", model = "m1", cost = 0.5, max_concurrent = 2 }, { provider = "dear", model = "m1", cost = 5.0 }]\n'
    )
    server = serve(toml)
    try:
        with server.http() as client:
            assert {ask(client)[0] for _ in range(5)} == {"cheap/m1"}
        served: list[str] = []

        def one() -> None:
            with server.http() as client:
                served.append(ask(client)[0])

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join()
        assert sorted(served) == ["cheap/m1", "cheap/m1", "dear/m1", "dear/m1"]
    finally:
        server.stop()


def test_every_deployment_full_is_a_503_with_retry_after(fakes, admin):
    a, b = fakes
    a.reply(Reply(chunks=completion_events("alpha says hello"), delay=1.0))
    toml = upstreams_toml(a=a) + (
        "[plugins.router]\n[plugins.router.models.smart]\n"
        'deployments = [{ provider = "a", model = "m1", max_concurrent = 1 }]\n'
    )
    server = serve(toml)
    try:
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(ask(server.http())))
        t.start()
        until(lambda: router_state(server)["models"]["smart"]["deployments"][0]["in_flight"] == 1, timeout=5)
        response = server.http().post("/v1/chat/completions", json={"model": "smart", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "max_concurrent" in response.json()["error"]["message"]
        t.join()
        assert result[0][0] == "a/m1"
    finally:
        server.stop()


def test_weighted_follows_the_weights(fakes, admin):
    a, b = fakes
    toml = upstreams_toml(a=a, b=b) + (
        "[plugins.router]\nseed = 5\n[plugins.router.models.smart]\nstrategy = \"weighted\"\n"
        'deployments = [{ provider = "a", model = "m1", weight = 3 }, { provider = "b", model = "m1", weight = 1 }]\n'
    )
    server = serve(toml)
    try:
        with server.http() as client:
            served = [ask(client)[0] for _ in range(120)]
        share = served.count("a/m1") / len(served)
        assert 0.62 <= share <= 0.88, share
    finally:
        server.stop()


def test_a_stopped_hedged_stream_closes_both_upstreams(fakes, admin):
    a, b = fakes
    a.reply(Reply(chunks=completion_events("alpha says hello"), delay=5.0))
    b.reply(Reply(chunks=completion_events(" ".join(["bravo"] * 500)), chunk_delay=0.02))
    toml = upstreams_toml(a=a, b=b) + (
        "[plugins.router]\nseed = 1\nhedge_burst = 5\n[plugins.router.models.smart]\nstrategy = \"weighted\"\nhedge_after_ms = 100\n"
        'deployments = [{ provider = "a", model = "m1", weight = 1 }, { provider = "b", model = "m1", weight = 0 }]\n'
    )
    server = serve(toml)
    try:
        with server.http() as client:
            with client.stream("POST", "/v1/chat/completions", json={"model": "smart", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
                session_id = response.headers["X-Session-ID"]
                assert response.headers["X-Routed-To"] == "b/m1"
                for line in response.iter_lines():
                    if "bravo" in line:
                        break
                stopped = client.post(f"/v1/sessions/{session_id}/stop")
                assert stopped.status_code == 200
        assert a.wait_closed(5) and all(r.cut for r in a.connection_log if r.requests)
        until(lambda: all(d["in_flight"] == 0 for d in router_state(server)["models"]["smart"]["deployments"]), timeout=5)
        assert any(r.cut for r in b.connection_log)
        state = router_state(server)
        assert deployment(state, "smart", "a/m1")["hedges"]["lost"] == 1 and deployment(state, "smart", "b/m1")["hedges"]["won"] == 1
    finally:
        server.stop()


def test_admin_view_needs_the_key_and_metrics_show_each_deployment(fakes, admin):
    a, b = fakes
    toml = upstreams_toml(a=a, b=b) + "[plugins.router]\n[plugins.router.models.smart]\n" + deployments("a", "b") + "[plugins.monitor]\n"
    server = serve(toml)
    try:
        with server.http() as client:
            ask(client)
            assert client.get("/admin/router").status_code == 401
            models = client.get("/v1/models").json()["data"]
            assert "smart" in [m["id"] for m in models]
            metrics = client.get("/metrics").text
        assert 'streamvisor_router_requests_total{deployment="a/m1",model="smart"}' in metrics or 'streamvisor_router_requests_total{deployment="b/m1",model="smart"}' in metrics
        assert "streamvisor_router_ttft_seconds" in metrics
    finally:
        server.stop()


def test_configuration_mistakes_are_named(fakes, admin):
    a, b = fakes
    with pytest.raises(RuntimeError) as caught:
        serve(upstreams_toml(a=a) + "[plugins.retry]\n[plugins.router]\n[plugins.router.models.smart]\n" + deployments("a"))
    assert "before the retry plugin" in str(unwrap(caught.value.__cause__))
    with pytest.raises(ConfigError, match="strategy"):
        PluginHost.from_config(make_config(upstreams_toml(a=a) + '[plugins.router]\n[plugins.router.models.smart]\nstrategy = "fastest"\n' + deployments("a")))
    server = serve(upstreams_toml(a=a) + "[plugins.router]\n[plugins.router.models.smart]\n" + 'deployments = [{ provider = "nope", model = "m1" }]\n[plugins.health]\n')
    try:
        response = server.http().post("/v1/chat/completions", json={"model": "smart", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 502
        assert "nope" in response.json()["error"]["message"]
        ready = server.http().get("/health/ready")
        assert ready.status_code == 503 and "smart" in ready.text
    finally:
        server.stop()


# -- the learning, without servers ---------------------------------------------------------------


def _state(name: str, weight: float = 1.0) -> Any:
    from streamvisor.plugins.router import Deployment
    from streamvisor.plugins.router.state import DeploymentState

    return DeploymentState(name, Deployment(model="m1", provider=name, weight=weight))


def test_a_slow_estimate_decays_toward_the_best_so_the_deployment_is_tried_again():
    from streamvisor.plugins.router.state import Tuning, order

    tuning = Tuning(half_life=10.0, explore=0.0, latency_tokens=0)
    fast, slow = _state("fast"), _state("slow")
    for _ in range(5):
        fast.first_token(0.05, tuning, now=0.0)
        slow.first_token(0.5, tuning, now=0.0)
    rng = random.Random(1)
    assert all(order("latency", [fast, slow], tuning, rng, now=1.0)[0][0] is fast for _ in range(50))
    # A hundred seconds (ten half-lives) later the slow one's estimate is within
    # a millisecond of the best's: the two share traffic until it is measured again.
    firsts = {order("latency", [fast, slow], tuning, rng, now=100.0)[0][0].name for _ in range(50)}
    assert firsts == {"fast", "slow"}


def test_errors_weigh_on_the_score_and_weight_zero_goes_last():
    from streamvisor.plugins.router.state import Tuning, order

    tuning = Tuning(explore=0.0, latency_tokens=0)
    steady, flaky = _state("steady"), _state("flaky")
    steady.first_token(0.10, tuning, now=0.0)
    flaky.first_token(0.08, tuning, now=0.0)
    for _ in range(4):
        flaky.failed(tuning, now=0.0)
    flaky.ejected_until = 0.0  # failures counted, not ejected: only the score speaks
    rng = random.Random(2)
    assert order("latency", [steady, flaky], tuning, rng, now=0.0)[0][0] is steady
    spare = _state("spare", weight=0.0)
    assert all(order("weighted", [spare, steady], tuning, rng)[0][0] is steady for _ in range(50))


def test_least_busy_picks_the_deployment_with_fewest_streams():
    from streamvisor.plugins.router.state import Tuning, order

    states = [_state(name) for name in "abc"]
    rng = random.Random(4)
    for _ in range(300):  # streams start (a pick) and end (at random)
        first = order("least_busy", states, Tuning(), rng)[0][0]
        assert first.in_flight == min(s.in_flight for s in states)
        first.in_flight += 1
        if rng.random() < 0.45:
            busy = [s for s in states if s.in_flight]
            rng.choice(busy).in_flight -= 1


def test_the_p90_of_the_time_to_first_token():
    from streamvisor.plugins.router.state import Tuning

    state = _state("a")
    for ms in range(1, 101):
        state.first_token(ms / 1000, Tuning(), now=0.0)
    assert state.percentile(90) == pytest.approx(0.090)
    assert state.percentile(50) == pytest.approx(0.050)


def test_hedge_after_p90_uses_the_learned_time_to_first_token(fakes, admin):
    a, b = fakes
    a.delay = 0.05
    toml = upstreams_toml(a=a, b=b) + (
        "[plugins.router]\nhedge_min_samples = 10\nhedge_burst = 5\n[plugins.router.models.smart]\n"
        'strategy = "weighted"\nhedge_after = "p90"\n'
        'deployments = [{ provider = "a", model = "m1", weight = 1 }, { provider = "b", model = "m1", weight = 0 }]\n'
    )
    server = serve(toml)
    try:
        with server.http() as client:
            for _ in range(10):  # no samples yet and no hedge_after_ms: no hedging while it learns
                assert ask(client)[0] == "a/m1"
            assert router_state(server)["hedging"]["hedged"] == 0
            p90 = deployment(router_state(server), "smart", "a/m1")["ttft_p90_ms"]
            assert 50 <= p90 < 150
            a.queue(Reply(chunks=completion_events("alpha says hello"), delay=2.0))
            started = time.perf_counter()
            routed, text = ask(client)
            took = time.perf_counter() - started
        assert (routed, text) == ("b/m1", "bravo says hello")
        assert took < 1.0  # hedged at the p90, not after the 2 s stall
        state = router_state(server)
        assert state["hedging"]["hedged"] == 1 and deployment(state, "smart", "b/m1")["hedges"]["won"] == 1
    finally:
        server.stop()


def test_a_retry_fallback_to_a_routed_model_is_routed(fakes, admin):
    a, b = fakes
    with FakeUpstream(models=["gone"]) as broken:
        broken.respond(503, b'{"error": {"message": "down"}}', {"Content-Type": "application/json"})
        toml = upstreams_toml(a=a, b=b) + (
            f'[[plugins.openai.upstreams]]\nname = "broken"\nbase_url = "{broken.url}"\nmodels = ["gone"]\n'
            "[plugins.router]\n[plugins.router.models.smart]\n" + deployments("a", "b")
            + '[plugins.retry]\nattempts = 1\n[plugins.retry.fallbacks]\ngone = ["smart"]\n'
        )
        server = serve(toml)
        try:
            with server.http() as client:
                served = {ask(client, model="gone") for _ in range(6)}
            assert served <= {("a/m1", "alpha says hello"), ("b/m1", "bravo says hello")} and served
            assert router_state(server)["models"]["smart"]["requests"] == 6
        finally:
            server.stop()


HEDGE_FIRST_A = (
    "[plugins.router]\nseed = 1\nhedge_burst = 5\n[plugins.router.models.smart]\nstrategy = \"weighted\"\nhedge_after_ms = 100\n"
    'deployments = [{ provider = "a", model = "m1", weight = 1 }, { provider = "b", model = "m1", weight = 0 }]\n'
    "[plugins.retry]\nattempts = 1\n"
)


def test_a_first_call_that_answers_after_the_hedge_started_still_wins(fakes, admin):
    a, b = fakes
    a.reply(Reply(chunks=completion_events("alpha says hello"), delay=0.3))
    b.reply(Reply(chunks=completion_events("bravo says hello"), delay=2.0))
    server = serve(upstreams_toml(a=a, b=b) + HEDGE_FIRST_A)
    try:
        with server.http() as client:
            assert ask(client) == ("a/m1", "alpha says hello")
        assert b.posts == 1  # the hedge was sent ...
        until(lambda: any(r.cut for r in b.connection_log))  # ... and cut when a answered
        state = router_state(server)
        assert deployment(state, "smart", "a/m1")["hedges"]["won"] == 1 and deployment(state, "smart", "b/m1")["hedges"]["lost"] == 1
        until(lambda: all(d["in_flight"] == 0 for d in router_state(server)["models"]["smart"]["deployments"]))
    finally:
        server.stop()


def test_when_the_first_call_fails_after_the_hedge_started_the_hedge_answers(fakes, admin):
    a, b = fakes
    a.reply(Reply(503, {"Content-Type": "application/json"}, b'{"error": {"message": "down"}}', delay=0.3))
    b.reply(Reply(chunks=completion_events("bravo says hello"), delay=0.4))
    server = serve(upstreams_toml(a=a, b=b) + HEDGE_FIRST_A)
    try:
        with server.http() as client:
            started = time.perf_counter()
            assert ask(client) == ("b/m1", "bravo says hello")
            # The hedge (sent at 0.1 s) answered at about 0.5 s: no new call after a's failure at 0.3 s.
            assert time.perf_counter() - started < 0.9
        assert a.posts == 1 and b.posts == 1
        state = router_state(server)
        assert deployment(state, "smart", "a/m1")["failures"] == 1
        assert state["failovers"] == 0 and state["hedging"]["hedged"] == 1
        # A failure is not a lost race.
        assert deployment(state, "smart", "a/m1")["hedges"]["lost"] == 0
    finally:
        server.stop()


def test_when_the_first_call_fails_before_the_hedge_time_it_fails_over_at_once(fakes, admin):
    a, b = fakes
    a.respond(503, b'{"error": {"message": "down"}}', {"Content-Type": "application/json"})
    server = serve(upstreams_toml(a=a, b=b) + HEDGE_FIRST_A)
    try:
        with server.http() as client:
            assert ask(client) == ("b/m1", "bravo says hello")
        state = router_state(server)
        assert state["failovers"] == 1 and state["hedging"]["hedged"] == 0
    finally:
        server.stop()
