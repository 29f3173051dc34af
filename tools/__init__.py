"""agentloop tools (work in progress; see the issues)."""
