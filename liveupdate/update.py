"""`luvmm update`: live-update the host through the LUO agent and collect the
restored VMMs' reports."""

from __future__ import annotations

from liveupdate.agent_client import AgentError, wait_for_agent
from liveupdate.state import StateDir


def update_once(state: StateDir, *, timeout: float = 60.0) -> dict:
    """One live update; returns the agent's record of it, with each VMM's report."""
    client, hello = wait_for_agent(state, timeout)
    try:
        started = client.call({"op": "update", "timeout": timeout})[0]
    finally:
        client.close()
    client, hello = wait_for_agent(state, timeout, not_pid=hello["pid"])
    try:
        result = client.call({"op": "result", "timeout": timeout})[0]
    finally:
        client.close()
    if not result or result.get("id") != started["update"]:
        raise AgentError(5, f"the agent lost update {started['update']}")
    if result.get("phase") == "failed":
        raise AgentError(result.get("errno") or 5, result.get("error", "update failed"))
    return result
