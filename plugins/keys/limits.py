"""Counting requests, tokens, concurrent streams and spend against limits.

Two limiters with one interface: `MemoryLimiter` for one instance, and
`RedisLimiter`, whose counters every instance sharing the Redis and the prefix
uses, so that N instances allow the limit once, not N times.

- Requests and tokens per minute are sliding windows of one-second buckets: a
  request counts in the second it was admitted, for the next 60 seconds.
- Tokens are reserved at admission (the prompt's estimate plus `max_tokens`)
  and corrected when the session ends (`settle`) in the bucket they were counted
  in, so a stream that stopped early gives back what it did not use.
- Concurrent streams are leases: one per live session. In Redis a lease has a
  TTL that the owning instance renews (`renew`) while the session runs, so the
  leases of an instance that crashed expire by themselves.
- A budget is checked against what was spent in its period plus what the live
  sessions reserved (their leases carry their reserved cost): a request is
  admitted while that sum is below the budget. So a budget is overrun by at
  most one admitted request's reservation.

In Redis every decision is one Lua script run on Redis's own clock (`TIME`), so
instances with drifting clocks still share one window. Several scopes (a key
and its team) are checked and counted in the same script: both must pass.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

import attrs

from streamvisor.hooks import RedisScript as Script
from streamvisor.hooks import RespClient

from .records import Limits

#: Seconds a request or a token counts against a per-minute limit.
WINDOW = 60


@attrs.frozen
class Scope:
    """One set of limits a request must pass: its key's, or its team's."""

    #: "key:<id>" or "team:<name>".
    id: str
    limits: Limits
    #: The budget period the request falls in ("" without a period).
    period: str
    #: Seconds the budget counter should live (to the period's end, and a day).
    budget_ttl: int
    #: What the store says was spent in the period: a Redis counter that was
    #: lost (evicted, Redis restarted) starts again from it.
    spent_floor: float = 0.0
    #: For a key scope with Redis: the key's version this instance knows; a
    #: different one in Redis means the key changed (revoked, rotated, limits).
    version: str = ""


@attrs.frozen
class Window:
    """What a per-minute limit looks like after a request: for the headers."""

    limit: int
    remaining: int
    #: Seconds until the window has room again (the oldest bucket leaves it).
    reset: float


@attrs.frozen
class Decision:
    ok: bool
    #: When refused: "requests", "tokens", "concurrency", "budget" or "stale".
    refusal: str | None = None
    #: The scope that refused.
    scope: str | None = None
    #: Seconds until a retry may pass.
    retry_after: float = 1.0
    #: The second the request counted in (where its tokens are corrected).
    bucket: int = 0
    #: After an admission: the tightest request and token windows.
    requests: Window | None = None
    tokens: Window | None = None
    #: A refused budget: what was spent, and reserved by live sessions.
    spent: float = 0.0
    reserved: float = 0.0


def _tightest(current: Window | None, new: Window | None) -> Window | None:
    if new is None:
        return current
    if current is None or new.remaining < current.remaining:
        return new
    return current


class _Buckets:
    """One-second buckets over the last minute, with their running total."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.total = 0

    def trim(self, second: int) -> None:
        buckets = self.buckets
        while buckets:
            oldest = next(iter(buckets))
            if oldest > second - WINDOW:
                break
            self.total -= buckets.pop(oldest)

    def oldest(self, second: int) -> int:
        return next(iter(self.buckets)) if self.buckets else second

    def add(self, second: int, amount: int) -> None:
        self.buckets[second] = self.buckets.get(second, 0) + amount
        self.total += amount

    def correct(self, second: int, amount: int) -> None:
        if second in self.buckets:
            self.buckets[second] += amount
            self.total += amount


class MemoryLimiter:
    """Counters in this process: exact for one instance."""

    name = "memory"

    def __init__(self) -> None:
        self._requests: dict[str, _Buckets] = collections.defaultdict(_Buckets)
        self._tokens: dict[str, _Buckets] = collections.defaultdict(_Buckets)
        #: scope -> session -> reserved cost
        self._leases: dict[str, dict[str, float]] = collections.defaultdict(dict)
        #: (scope, period) -> spent
        self._spent: dict[tuple[str, str], float] = {}

    async def admit(self, scopes: list[Scope], session_id: str, tokens: int, cost: float) -> Decision:
        second = int(time.time())
        requests = token_window = None
        for scope in scopes:
            limits = scope.limits
            if limits.rpm_limit is not None:
                window = self._requests[scope.id]
                window.trim(second)
                if window.total + 1 > limits.rpm_limit:
                    return Decision(False, "requests", scope.id, window.oldest(second) + WINDOW - second)
            if limits.tpm_limit is not None:
                window = self._tokens[scope.id]
                window.trim(second)
                # A request larger than the whole limit passes an empty window:
                # otherwise it could never pass.
                if window.total and window.total + tokens > limits.tpm_limit:
                    return Decision(False, "tokens", scope.id, window.oldest(second) + WINDOW - second)
            leases = self._leases[scope.id]
            if limits.max_concurrent_streams is not None and len(leases) >= limits.max_concurrent_streams:
                return Decision(False, "concurrency", scope.id, 1)
            if limits.max_budget_usd is not None:
                spent = self._spent.setdefault((scope.id, scope.period), scope.spent_floor)
                reserved = sum(leases.values())
                if spent + reserved >= limits.max_budget_usd:
                    return Decision(False, "budget", scope.id, 0, spent=spent, reserved=reserved)
        for scope in scopes:
            limits = scope.limits
            if limits.rpm_limit is not None:
                window = self._requests[scope.id]
                window.add(second, 1)
                requests = _tightest(requests, Window(limits.rpm_limit, max(0, limits.rpm_limit - window.total), window.oldest(second) + WINDOW - second))
            if limits.tpm_limit is not None:
                window = self._tokens[scope.id]
                window.add(second, tokens)
                token_window = _tightest(
                    token_window, Window(limits.tpm_limit, max(0, limits.tpm_limit - window.total), window.oldest(second) + WINDOW - second)
                )
            if limits.max_concurrent_streams is not None or limits.max_budget_usd is not None:
                self._leases[scope.id][session_id] = cost
        return Decision(True, bucket=second, requests=requests, tokens=token_window)

    def settle(self, scopes: list[Scope], session_id: str, bucket: int, reserved_tokens: int, tokens: int, cost: float) -> None:
        for scope in scopes:
            leases = self._leases.get(scope.id)
            if leases is not None:
                leases.pop(session_id, None)
                if not leases:
                    del self._leases[scope.id]
            if scope.limits.tpm_limit is not None:
                self._tokens[scope.id].correct(bucket, tokens - reserved_tokens)
            key = (scope.id, scope.period)
            if key in self._spent:
                self._spent[key] += cost

    async def renew(self, leases: dict[str, list[str]], lease_seconds: float) -> None:
        """Leases in memory do not expire: nothing to renew."""

    def charge(self, scope_id: str, period: str, cost: float) -> None:
        """Spend outside a settlement (an interrupted session's)."""
        key = (scope_id, period)
        if key in self._spent:
            self._spent[key] += cost

    async def bump(self, key_id: str) -> None:
        """One process: the plugin's own cache is all there is to update."""

    async def version(self, key_id: str) -> str:
        return ""

    def live(self, scope_id: str) -> int:
        return len(self._leases.get(scope_id, ()))

    def trim(self) -> None:
        """Drop the windows of scopes that had no request for a minute."""
        second = int(time.time())
        for table in (self._requests, self._tokens):
            for scope_id in list(table):
                window = table[scope_id]
                window.trim(second)
                if not window.buckets:
                    del table[scope_id]


# -- Redis -----------------------------------------------------------------------------------

# The layout under the prefix P, per scope S ("key:<id>" or "team:<name>"):
#   P S:r           hash second -> requests admitted in it, 'n' -> their total,
#                   'o' -> the oldest second counted (expires after a minute idle)
#   P S:t           the same for tokens
#   P S:l           sorted set session -> lease expiry (ms, Redis clock)
#   P S:lc          hash session -> reserved cost of its lease
#   P S:s:<period>  hash spent -> US dollars spent in the budget period
#   P v             hash "key:<id>" -> version (bumped when a key changes)
# Key names are built from ARGV: a standalone Redis (not Redis Cluster) is assumed.

_LUA_WINDOW = """
-- A window is a hash of per-second counts, with their total in 'n' and the
-- oldest second counted in 'o': a request reads two fields, and the seconds are
-- walked only when the oldest one has left the window (once a second at most).
local function window(key, sec)
  local head = redis.call('HMGET', key, 'n', 'o')
  local total, oldest = tonumber(head[1]), tonumber(head[2])
  if total == nil or oldest == nil then return 0, sec end
  if oldest > sec - 60 then return total, oldest end
  local all = redis.call('HGETALL', key)
  total, oldest = 0, nil
  for i = 1, #all, 2 do
    local name = all[i]
    if name ~= 'n' and name ~= 'o' then
      local s = tonumber(name)
      if s <= sec - 60 then
        redis.call('HDEL', key, name)
      else
        total = total + tonumber(all[i + 1])
        if oldest == nil or s < oldest then oldest = s end
      end
    end
  end
  redis.call('HSET', key, 'n', total, 'o', oldest or sec)
  redis.call('EXPIRE', key, 61)
  return total, oldest or sec
end

-- The TTL is set when a window starts and renewed when it is trimmed, which
-- steady traffic does every second: an idle window goes a minute after.
local function count(key, sec, amount)
  redis.call('HINCRBY', key, sec, amount)
  redis.call('HINCRBY', key, 'n', amount)
  if redis.call('HSETNX', key, 'o', sec) == 1 then redis.call('EXPIRE', key, 61) end
end

local function leases(base, now_ms)
  local lk, ck = base .. ':l', base .. ':lc'
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now_ms)
  for _, s in ipairs(expired) do redis.call('HDEL', ck, s) end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', lk, '-inf', now_ms) end
  return lk, ck
end
"""

# Returns 'ok,<second>' and six window fields per scope, or '<refusal>,<scope>,...'.
# ARGV: prefix, session, tokens, cost, lease_ms, n, then per scope:
#   id, rpm, tpm, conc, budget, period, floor, budget_ttl, version ('' = none)
_LUA_ADMIT = (
    _LUA_WINDOW
    + """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, session = ARGV[1], ARGV[2]
local tokens, cost, lease = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local plans = {}
for i = 0, n - 1 do
  local b = 7 + i * 9
  local id = ARGV[b]
  local rpm, tpm, conc, budget = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local period, floor, bttl, version = ARGV[b + 5], ARGV[b + 6], tonumber(ARGV[b + 7]), ARGV[b + 8]
  if version ~= '' then
    local v = redis.call('HGET', prefix .. 'v', id) or '0'
    if v ~= version then return 'stale,' .. id .. ',' .. v end
  end
  local base = prefix .. id
  local p = {base = base, rpm = rpm, tpm = tpm, lease = (conc ~= nil or budget ~= nil)}
  if rpm then
    local used, oldest = window(base .. ':r', sec)
    if used + 1 > rpm then return 'requests,' .. id .. ',' .. (oldest + 60 - sec) end
    p.rused, p.roldest = used, oldest
  end
  if tpm then
    local used, oldest = window(base .. ':t', sec)
    if used > 0 and used + tokens > tpm then return 'tokens,' .. id .. ',' .. (oldest + 60 - sec) end
    p.tused, p.toldest = used, oldest
  end
  if p.lease then
    local lk, ck = leases(base, now_ms)
    p.live = redis.call('ZCARD', lk)
    if conc and p.live >= conc then return 'concurrency,' .. id .. ',1' end
    if budget then
      local bk = base .. ':s:' .. period
      local spent = tonumber(redis.call('HGET', bk, 'spent'))
      if spent == nil then
        redis.call('HSET', bk, 'spent', floor)
        redis.call('EXPIRE', bk, bttl)
        spent = tonumber(floor)
      end
      local reserved = 0
      for _, v in ipairs(redis.call('HVALS', ck)) do reserved = reserved + tonumber(v) end
      if spent + reserved >= budget then return 'budget,' .. id .. ',0,' .. tostring(spent) .. ',' .. tostring(reserved) end
    end
  end
  plans[#plans + 1] = p
end
local out = {'ok', tostring(sec)}
for _, p in ipairs(plans) do
  if p.rpm then count(p.base .. ':r', sec, 1) end
  if p.tpm then count(p.base .. ':t', sec, tokens) end
  if p.lease then
    redis.call('ZADD', p.base .. ':l', now_ms + lease, session)
    redis.call('HSET', p.base .. ':lc', session, tostring(cost))
    if p.live == 0 then
      -- New leases: their keys' TTL is set here and renewed by the owners'
      -- renewals (every third of a lease) while any is live.
      redis.call('PEXPIRE', p.base .. ':l', lease * 4)
      redis.call('PEXPIRE', p.base .. ':lc', lease * 4)
    end
  end
  out[#out + 1] = p.rpm and tostring(p.rpm) or ''
  out[#out + 1] = p.rpm and tostring(p.rpm - p.rused - 1) or ''
  out[#out + 1] = p.rpm and tostring(p.roldest + 60 - sec) or ''
  out[#out + 1] = p.tpm and tostring(p.tpm) or ''
  out[#out + 1] = p.tpm and tostring(p.tpm - p.tused - tokens) or ''
  out[#out + 1] = p.tpm and tostring(p.toldest + 60 - sec) or ''
end
return table.concat(out, ',')
"""
)

# ARGV: prefix, n sessions, then per session: session, bucket, n scopes, then
# per scope: id, token delta ('' = none), cost, period. Many sessions per call:
# settling one at a time fell behind the sessions' ends at concurrency 32, and
# the sessions not yet settled still held their leases.
_LUA_SETTLE = """
local prefix, n = ARGV[1], tonumber(ARGV[2])
local b = 3
for _ = 1, n do
  local session, bucket, scopes = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2])
  b = b + 3
  for _ = 1, scopes do
    local base = prefix .. ARGV[b]
    redis.call('ZREM', base .. ':l', session)
    redis.call('HDEL', base .. ':lc', session)
    local delta = ARGV[b + 1]
    if delta ~= '' and redis.call('HEXISTS', base .. ':t', bucket) == 1 then
      redis.call('HINCRBY', base .. ':t', bucket, tonumber(delta))
      redis.call('HINCRBY', base .. ':t', 'n', tonumber(delta))
    end
    local cost = tonumber(ARGV[b + 2])
    local bk = base .. ':s:' .. ARGV[b + 3]
    if cost > 0 and redis.call('EXISTS', bk) == 1 then redis.call('HINCRBYFLOAT', bk, 'spent', cost) end
    b = b + 4
  end
end
return n
"""

# ARGV: the budget counter's key, cost
_LUA_CHARGE = """
if redis.call('EXISTS', ARGV[1]) == 1 then return redis.call('HINCRBYFLOAT', ARGV[1], 'spent', ARGV[2]) end
return false
"""

# ARGV: prefix, lease_ms, then pairs: scope id, session
_LUA_RENEW = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, lease = ARGV[1], tonumber(ARGV[2])
local renewed = 0
for i = 3, #ARGV, 2 do
  renewed = renewed + redis.call('ZADD', prefix .. ARGV[i] .. ':l', 'XX', 'CH', now_ms + lease, ARGV[i + 1])
  redis.call('PEXPIRE', prefix .. ARGV[i] .. ':l', lease * 4)
  redis.call('PEXPIRE', prefix .. ARGV[i] .. ':lc', lease * 4)
end
return renewed
"""


def _num(value: Any) -> Any:
    return "" if value is None else value


_ADMIT, _SETTLE, _RENEW, _CHARGE = (Script(source) for source in (_LUA_ADMIT, _LUA_SETTLE, _LUA_RENEW, _LUA_CHARGE))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.frozen
class Settlement:
    """A session's end, as the limiter settles it."""

    session_id: str
    scopes: list[Scope]
    bucket: int
    reserved_tokens: int
    tokens: int
    cost: float


class RedisLimiter:
    """Counters in Redis, shared by every instance with the same URL and prefix."""

    name = "redis"

    def __init__(self, url: str, prefix: str, lease_seconds: float, timeout: float) -> None:
        self.prefix = prefix
        self.lease_ms = max(1000, int(lease_seconds * 1000))
        self.client = RespClient(url, timeout)

    async def admit(self, scopes: list[Scope], session_id: str, tokens: int, cost: float) -> Decision:
        args: list[Any] = [self.prefix, session_id, tokens, cost, self.lease_ms, len(scopes)]
        for scope in scopes:
            limits = scope.limits
            args += [
                scope.id,
                _num(limits.rpm_limit),
                _num(limits.tpm_limit),
                _num(limits.max_concurrent_streams),
                _num(limits.max_budget_usd),
                scope.period,
                scope.spent_floor,
                scope.budget_ttl,
                scope.version,
            ]
        # One comma-separated string: one reply to parse, not an array of them.
        reply = (await self.client.run(_ADMIT, *args)).decode().split(",")
        verdict = reply[0]
        if verdict == "stale":
            return Decision(False, "stale", reply[1])
        if verdict == "budget":
            return Decision(False, "budget", reply[1], 0, spent=float(reply[3]), reserved=float(reply[4]))
        if verdict != "ok":
            return Decision(False, verdict, reply[1], float(reply[2]))
        requests = tokens_window = None
        for i in range(2, len(reply), 6):
            rpm, rleft, rreset, tpm, tleft, treset = reply[i : i + 6]
            if rpm:
                requests = _tightest(requests, Window(int(rpm), max(0, int(rleft)), float(rreset)))
            if tpm:
                tokens_window = _tightest(tokens_window, Window(int(tpm), max(0, int(tleft)), float(treset)))
        return Decision(True, bucket=int(reply[1]), requests=requests, tokens=tokens_window)

    async def settle_many(self, settlements: list[Settlement]) -> None:
        """Settle many sessions in one script call."""
        args: list[Any] = [self.prefix, len(settlements)]
        for done in settlements:
            args += [done.session_id, done.bucket, len(done.scopes)]
            for scope in done.scopes:
                delta = "" if scope.limits.tpm_limit is None else done.tokens - done.reserved_tokens
                args += [scope.id, delta, done.cost, scope.period]
        await self.client.run(_SETTLE, *args)

    async def renew(self, leases: dict[str, list[str]], lease_seconds: float) -> None:
        """Push the expiry of these live sessions' leases (scope -> sessions)."""
        pairs: list[str] = []
        for scope_id, sessions in leases.items():
            for session_id in sessions:
                pairs += [scope_id, session_id]
        for start in range(0, len(pairs), 1000):
            await self.client.run(_RENEW, self.prefix, self.lease_ms, *pairs[start : start + 1000])

    async def charge(self, scope_id: str, period: str, cost: float) -> None:
        """Spend outside a settlement (an interrupted session's), into a
        budget counter that exists (a missing one starts from the store)."""
        await self.client.run(_CHARGE, f"{self.prefix}{scope_id}:s:{period}", cost)

    async def ping(self) -> None:
        await self.client.execute("PING")

    async def bump(self, key_id: str) -> None:
        """Tell every instance that a key changed: their next check of it fails
        its version and reads it again."""
        await self.client.execute("HINCRBY", self.prefix + "v", f"key:{key_id}", 1)

    async def version(self, key_id: str) -> str:
        value = await self.client.execute("HGET", self.prefix + "v", f"key:{key_id}")
        return "0" if value is None else _text(value)

    def trim(self) -> None:
        """Redis expires idle windows by itself."""


def budget_ttl(end: float | None, now: float) -> int:
    """Seconds a budget counter lives: to its period's end and a day more; 90
    days (renewed as it is used) for a budget without a period."""
    if end is None:
        return 90 * 86400
    return max(60, math.ceil(end - now) + 86400)
