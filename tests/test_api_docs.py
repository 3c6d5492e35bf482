"""docs/api.md, run as written: its Python blocks, in order, in one namespace,
against a real server with the store on SQLite and a scripted model."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import start_server

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
_BLOCK = re.compile(r"^```python( setup)?\n(.*?)^```", re.M | re.S)

TOML = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "storyteller"
text = "Once upon a time there was a gateway that never lost a stream, and every chunk it sent could be found again, even after the lights went out."
delay = 0.01

[plugins.usage]
[plugins.responses]
"""


def test_the_examples_of_the_session_api_run_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", "docs-admin-key")
    blocks = _BLOCK.findall(DOC.read_text(encoding="utf-8"))
    setup = [code for kind, code in blocks if kind]
    examples = [code for kind, code in blocks if not kind]
    assert len(setup) == 1 and len(examples) >= 6
    toml = TOML + f'\n[plugins.files]\nfolder = "{tmp_path}/files"\n\n[plugins.store]\nurl = "sqlite:///{tmp_path}/store.db"\n'
    with start_server(toml) as server:
        namespace: dict = {}
        exec(compile(setup[0], f"{DOC}:setup", "exec"), namespace)
        namespace.update(BASE_URL=server.url, MODEL="storyteller")
        for number, code in enumerate(examples, start=1):
            exec(compile(code, f"{DOC}:example {number}", "exec"), namespace)
        namespace["http"].close()
        # What the examples did is what they say they did.
        assert namespace["done"]["state"] == "completed"
        assert namespace["completion"]["choices"][0]["message"]["content"].startswith("Once upon a time")
        assert namespace["ids"][0] == 10
        assert namespace["replayed"].text.startswith("retry: 2000\n")
        assert namespace["page"]["data"] and len(namespace["page"]["data"]) == 2
        assert namespace["answer"].choices[0].message.content.startswith("Once upon a time")
