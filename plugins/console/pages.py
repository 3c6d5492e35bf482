"""The console's HTML: a server-rendered shell per page. The data comes from
the console's JSON and SSE routes, read by the page's small script module
(static/*.js); nothing is loaded from anywhere but this server."""

from __future__ import annotations

import html

#: (path, label) of the navigation, in order.
NAV = (
    ("/console/live", "Live"), ("/console/usage", "Usage"), ("/console/keys", "Keys"), ("/console/playground", "Playground"),
    ("/console/models", "Models and plugins"),
)


def layout(
    title: str, body: str, *, who: str | None, csrf: str = "", current: str = "", scripts: tuple[str, ...] = (), version: str = "",
    vendor: tuple[str, ...] = (),
) -> str:
    nav = ""
    if who is not None:
        marked = ' aria-current="page"'
        links = "".join(f'<li><a href="{path}"{marked if path == current else ""}>{html.escape(label)}</a></li>' for path, label in NAV)
        nav = f"""
<header class="top">
  <a class="brand" href="/console/live">streamvisor</a>
  <nav aria-label="Console"><ul>{links}</ul></nav>
  <form class="signout" method="post" action="/console/logout">
    <input type="hidden" name="csrf" value="{html.escape(csrf)}">
    <span class="who" title="Signed in as">{html.escape(who)}</span>
    <button type="submit">Sign out</button>
  </form>
</header>"""
    # Vendored libraries: classic scripts (they define globals) and their styles, before the page's modules.
    tags = "".join(
        f'<link rel="stylesheet" href="/console/static/vendor/{html.escape(name)}">' if name.endswith(".css")
        else f'<script src="/console/static/vendor/{html.escape(name)}"></script>'
        for name in vendor
    )
    tags += "".join(f'<script type="module" src="/console/static/{html.escape(name)}?v={html.escape(version)}"></script>' for name in scripts)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{html.escape(csrf)}">
<title>{html.escape(title)} · streamvisor console</title>
<link rel="stylesheet" href="/console/static/console.css?v={html.escape(version)}">
{tags}
</head>
<body>
{nav}
<main id="main">
{body}
</main>
</body>
</html>
"""


def login(error: str | None = None, next_path: str = "/console/live", *, no_keys: bool = False) -> str:
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    if no_keys:
        message += (
            '<p class="error" role="alert">This server has no key to sign in with: start it with '
            "<code>STREAMVISOR_ADMIN_KEY</code> set (or turn the keys plugin on and create an API key).</p>"
        )
    return f"""
<section class="login">
  <h1>Sign in to the console</h1>
  <p>Use the admin key (<code>STREAMVISOR_ADMIN_KEY</code>) to see everything, or an API key to see
  that key's own sessions and usage.</p>
  {message}
  <form method="post" action="/console/login">
    <input type="hidden" name="next" value="{html.escape(next_path)}">
    <label for="key">Key</label>
    <input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
    <button type="submit">Sign in</button>
  </form>
</section>"""


def live() -> str:
    return """
<h1>Live</h1>
<section aria-labelledby="live-title">
  <h2 id="live-title">Live sessions <span id="live-count" class="count" aria-live="polite">0</span></h2>
  <p id="feed-state" class="muted" role="status">Connecting…</p>
  <div class="table-wrap">
  <table id="live" class="sessions">
    <thead><tr>
      <th scope="col">Session</th><th scope="col">Model</th><th scope="col">Identity</th><th scope="col">State</th>
      <th scope="col" class="num">Age</th><th scope="col" class="num">Tokens</th><th scope="col" class="num">Tokens/s</th>
      <th scope="col" class="num">First token</th><th scope="col"><span class="visually-hidden">Actions</span></th>
    </tr></thead>
    <tbody></tbody>
  </table>
  </div>
</section>
<section aria-labelledby="history-title">
  <h2 id="history-title">Finished</h2>
  <form id="filters" class="filters">
    <label>State <select name="state">
      <option value="">any</option><option>completed</option><option>failed</option><option>stopped</option>
      <option>disconnected</option><option>interrupted</option>
    </select></label>
    <label>Model <input name="model" size="14"></label>
    <label>Identity <input name="identity" size="14"></label>
    <button type="submit">Filter</button>
  </form>
  <div class="table-wrap">
  <table id="history" class="sessions">
    <thead><tr>
      <th scope="col">Session</th><th scope="col">Model</th><th scope="col">Identity</th><th scope="col">State</th>
      <th scope="col">Started</th><th scope="col" class="num">Tokens</th><th scope="col" class="num">Duration</th>
      <th scope="col" class="num">Cost</th>
    </tr></thead>
    <tbody></tbody>
  </table>
  </div>
  <button id="more" type="button" hidden>Older</button>
</section>"""


def session(session_id: str) -> str:
    sid = html.escape(session_id)
    return f"""
<p><a href="/console/live">← Live</a></p>
<h1>Session <code>{sid}</code></h1>
<div id="session" data-session="{sid}">
  <p id="summary" class="muted" role="status">Loading…</p>
  <div id="timing" class="timing" aria-label="Timing"></div>
  <p id="gaps" class="muted"></p>
  <dl id="facts" class="facts"></dl>
  <p><button id="stop" type="button" hidden>Stop this session</button></p>
  <section aria-labelledby="request-title">
    <h2 id="request-title">Request</h2>
    <ol id="messages" class="messages"></ol>
  </section>
  <section aria-labelledby="output-title">
    <h2 id="output-title">Output</h2>
    <details id="reasoning-box" hidden><summary>Reasoning</summary><pre id="reasoning" class="reasoning"></pre></details>
    <pre id="output" class="output" aria-live="polite"></pre>
  </section>
</div>"""


def models() -> str:
    return """
<h1>Models and plugins</h1>
<p id="models-state" class="muted" role="status">Loading…</p>
<section aria-labelledby="providers-title">
  <h2 id="providers-title">Providers and models</h2>
  <div class="table-wrap"><table id="providers" class="sessions">
    <thead><tr><th scope="col">Provider</th><th scope="col">Models</th><th scope="col">Circuit</th></tr></thead>
    <tbody></tbody>
  </table></div>
</section>
<section aria-labelledby="health-title">
  <h2 id="health-title">Readiness checks</h2>
  <div class="table-wrap"><table id="health" class="sessions">
    <thead><tr><th scope="col">Check</th><th scope="col">Ready</th><th scope="col" class="num">Took</th><th scope="col">Why</th></tr></thead>
    <tbody></tbody>
  </table></div>
</section>
<section aria-labelledby="plugins-title">
  <h2 id="plugins-title">Plugins</h2>
  <div class="table-wrap"><table id="plugins" class="sessions">
    <thead><tr><th scope="col">Plugin</th><th scope="col">Version</th><th scope="col">From</th><th scope="col">Contract</th>
      <th scope="col" class="num">Errors</th><th scope="col">Hooks</th></tr></thead>
    <tbody></tbody>
  </table></div>
</section>"""


def playground() -> str:
    return """
<h1>Playground</h1>
<form id="play" class="play">
  <label for="model">Model</label>
  <select id="model" name="model" required></select>
  <label for="system">System message</label>
  <textarea id="system" name="system" rows="2"></textarea>
  <label for="user">User message</label>
  <textarea id="user" name="user" rows="4" required>Write a haiku about streams.</textarea>
  <div class="row">
    <label for="temperature">Temperature</label>
    <input id="temperature" name="temperature" type="number" min="0" max="2" step="0.1" value="0.7">
    <label for="max_tokens">Max tokens</label>
    <input id="max_tokens" name="max_tokens" type="number" min="1" max="100000" step="1" value="256">
  </div>
  <div class="row">
    <button id="send" type="submit">Send</button>
    <button id="halt" type="button" class="danger" disabled>Stop</button>
  </div>
</form>
<p id="play-state" class="muted" role="status"></p>
<section aria-labelledby="answer-title">
  <h2 id="answer-title">Answer</h2>
  <details id="play-reasoning-box" hidden><summary>Reasoning</summary><pre id="play-reasoning" class="reasoning"></pre></details>
  <pre id="answer" class="output" aria-live="polite"></pre>
  <dl id="play-facts" class="facts"></dl>
</section>
<section aria-labelledby="snippet-title">
  <h2 id="snippet-title">The same request</h2>
  <div class="row" role="group" aria-label="Snippet language">
    <button type="button" class="secondary" data-snippet="curl" aria-pressed="true">curl</button>
    <button type="button" class="secondary" data-snippet="python" aria-pressed="false">Python</button>
  </div>
  <pre id="snippet" class="output"></pre>
</section>"""


def usage() -> str:
    return """
<h1>Usage</h1>
<form id="usage-form" class="row">
  <fieldset class="row"><legend class="visually-hidden">Window</legend>
    <label><input type="radio" name="window" value="1h" checked> 1 hour</label>
    <label><input type="radio" name="window" value="24h"> 24 hours</label>
    <label><input type="radio" name="window" value="30d"> 30 days</label>
  </fieldset>
  <label>By <select name="by">
    <option value="model">model</option><option value="key_id">key</option><option value="outcome">outcome</option>
    <option value="identity">identity</option>
  </select></label>
  <a id="csv" href="/console/api/usage.csv?window=1h&amp;by=model" download>Download CSV</a>
</form>
<p id="usage-state" class="muted" role="status">Loading…</p>
<div class="charts">
  <figure><figcaption>Tokens (prompt and completion)</figcaption><div id="chart-tokens" class="chart" role="img" aria-label="Tokens over time"></div></figure>
  <figure><figcaption>Cost (US dollars)</figcaption><div id="chart-cost" class="chart" role="img" aria-label="Cost over time"></div></figure>
  <figure><figcaption>Sessions</figcaption><div id="chart-sessions" class="chart" role="img" aria-label="Sessions over time"></div></figure>
</div>
<div class="table-wrap">
<table id="usage-table" class="sessions">
  <thead><tr><th scope="col" id="group-head">Model</th><th scope="col" class="num">Sessions</th><th scope="col" class="num">Prompt tokens</th>
    <th scope="col" class="num">Completion tokens</th><th scope="col" class="num">Reasoning tokens</th><th scope="col" class="num">Cost</th></tr></thead>
  <tbody></tbody>
</table>
</div>"""


def keys(admin: bool) -> str:
    create = """
<section aria-labelledby="create-title">
  <h2 id="create-title">Create a key</h2>
  <form id="create-key" class="grid-form">
    <label for="k-identity">Identity</label><input id="k-identity" name="identity" required placeholder="who uses it">
    <label for="k-name">Name</label><input id="k-name" name="name" placeholder="optional">
    <label for="k-team">Team</label><input id="k-team" name="team" placeholder="optional">
    <label for="k-rpm">Requests per minute</label><input id="k-rpm" name="rpm_limit" type="number" min="1" step="1">
    <label for="k-tpm">Tokens per minute</label><input id="k-tpm" name="tpm_limit" type="number" min="1" step="1">
    <label for="k-streams">Concurrent streams</label><input id="k-streams" name="max_concurrent_streams" type="number" min="1" step="1">
    <label for="k-budget">Budget (US dollars)</label><input id="k-budget" name="max_budget_usd" type="number" min="0" step="any">
    <label for="k-period">Budget period</label>
    <select id="k-period" name="budget_period"><option value="">all time</option><option value="day">day</option><option value="month">month</option></select>
    <span></span><button type="submit">Create key</button>
  </form>
</section>""" if admin else ""
    return f"""
<h1>Keys</h1>
<p id="keys-state" class="muted" role="status">Loading…</p>
<div id="secret-box" class="secret" role="alert" hidden>
  <p><strong>Copy the secret now: it is not shown again.</strong></p>
  <p><code id="secret"></code> <button id="copy" type="button" class="secondary">Copy</button> <span id="copied" class="muted" aria-live="polite"></span></p>
</div>
{create}
<section aria-labelledby="keys-title">
  <h2 id="keys-title">{"API keys" if admin else "Your key"}</h2>
  <div class="table-wrap"><table id="keys" class="sessions">
    <thead><tr><th scope="col">Key</th><th scope="col">Identity</th><th scope="col">Team</th><th scope="col">Limits</th>
      <th scope="col" class="num">Spent</th><th scope="col">Budget</th><th scope="col">State</th>
      <th scope="col"><span class="visually-hidden">Actions</span></th></tr></thead>
    <tbody></tbody>
  </table></div>
</section>
<dialog id="limits-dialog" aria-labelledby="limits-title">
  <form id="limits-form" method="dialog" class="grid-form">
    <h2 id="limits-title">Limits of <code id="limits-key"></code></h2><span></span>
    <label for="l-rpm">Requests per minute</label><input id="l-rpm" name="rpm_limit" type="number" min="1" step="1">
    <label for="l-tpm">Tokens per minute</label><input id="l-tpm" name="tpm_limit" type="number" min="1" step="1">
    <label for="l-streams">Concurrent streams</label><input id="l-streams" name="max_concurrent_streams" type="number" min="1" step="1">
    <label for="l-budget">Budget (US dollars)</label><input id="l-budget" name="max_budget_usd" type="number" min="0" step="any">
    <label for="l-period">Budget period</label>
    <select id="l-period" name="budget_period"><option value="">all time</option><option value="day">day</option><option value="month">month</option></select>
    <button type="button" class="secondary" id="limits-cancel">Cancel</button><button type="submit" value="save">Save</button>
  </form>
</dialog>"""
