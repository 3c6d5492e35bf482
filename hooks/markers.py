"""The two pluggy markers of the contract, under the project name `streamvisor`."""

import pluggy

PROJECT = "streamvisor"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
