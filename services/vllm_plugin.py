"""vLLM general plugin (entry point ``vllm.general_plugins``): loaded by vLLM in each of its own
processes - the API server, the engine core and every worker - before the engine starts.

It makes those processes exit without the final garbage collection (``p2r.core.exiting``): a
server stop spent 5 s waiting for the engine core, which itself waited on its worker's, both
collecting after their teardown was complete.
"""

from __future__ import annotations

from p2r.core.exiting import skip_exit_collection_at_exit


def register() -> None:
    skip_exit_collection_at_exit()
