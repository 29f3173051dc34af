"""agentloop.serve.inside_vllm: code that runs only inside vLLM's processes.

vLLM loads these through its `vllm.general_plugins` entry points (pyproject.toml):
`parsers` registers the tool and reasoning parsers of the chat templates (thin
adapters over agentloop.templates.parsing), `lora_cpu` swaps in correct,
GEMM-based LoRA ops for the CPU backend, `lora_compile` keeps torch.compile on
with LoRA, `adapter_fetch` loads adapters by URL (an engine on another host than
its gateway). They import vllm and torch; nothing in
the gateway, the trainer or the agents imports this package.
"""
