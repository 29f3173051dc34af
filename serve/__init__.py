"""agentloop gateway: the OpenAI-compatible HTTP layer, the engine supervisor and the store.

Nothing imported at package import time may pull in torch or vllm: the gateway
must start and answer /health without them.
"""
