"""agentloop agents (work in progress; see the issues)."""
