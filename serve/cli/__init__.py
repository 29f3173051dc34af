"""agentloop.serve.cli: the `agentloop` command line.

`main` builds the parser (serve, chat, keys and the admin commands) and turns
domain errors into exit codes; `admin` holds the commands that talk to a running
gateway's admin API or run the loop worker; `keys` manages API keys in the store
directly. `python -m agentloop.serve.cli` runs it.
"""
