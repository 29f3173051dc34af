"""agentloop rl (work in progress; see the issues)."""
