"""agentloop.serve.engine: the engine side of the gateway.

`client` reaches vLLM OpenAI servers over HTTP (`Engine`, `HttpEngine`,
`EnginePool`); `supervisor` starts and watches a local vLLM process and `boot`
brings engines up (supervised or attached); `router` maps the model names clients
send to adapter versions (`ServedVersions`, in-process `ModelRouter`); `adapters`
decides which versions are resident in the engines (`AdapterManager`: promotion,
canary, rollback, re-verification). `default_model` prepares the embedded model in
its own process. Nothing here imports torch or vllm.
"""
