"""The benchmark harness of issue 4: `python -m bench` (see bench/__main__.py).

One module per concern: `upstream` (the fake OpenAI-compatible upstream),
`loadgen` (the load generator), `hello` (hello-world baseline servers),
`servers` (starting and stopping the processes, the generated config),
`scenarios` (what each scenario does), `micro` (in-process costs),
`localmodel` (local model tokens/s), `system` (machine facts, RSS, limits),
`report` (statistics, the table, the JSON file).
"""
