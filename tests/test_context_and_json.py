"""The model's full context and JSON that ends, on the real engine (tiny model) through the gateway.

Owns: the context comes from the model (its config, as vLLM derives it; the
gateway reads it from the engine and shows it in /health); a request over it is
the engine's 400 in vLLM's words, never a 500 or a hang; an engine that cannot
start as configured fails the boot with vLLM's reason instead of restarting
forever; constrained JSON (response_format json_schema and json_object, and
forced tool-call arguments) has no free whitespace, so it ends when its value does.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import start_gateway
from tests.tiny_model import MODEL_CONFIG

ANSWER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "population": {"type": "integer", "minimum": 0, "maximum": 99999},
    "capital": {"type": "boolean"}},
    "required": ["city", "population", "capital"], "additionalProperties": False}
MSG = [{"role": "user", "content": "Describe Paris as JSON."}]


def free_whitespace(text: str, allowed: tuple[str, ...] = ()) -> list[int]:
    """Offsets of whitespace outside JSON strings, except a single space right after one of `allowed`."""
    out, in_str, esc = [], False, False
    for i, ch in enumerate(text):
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
            continue
        if ch == '"':
            in_str = True
        elif ch.isspace() and not (ch == " " and i and text[i - 1] in allowed and not text[i + 1:i + 2].isspace()):
            out.append(i)
    return out


def test_the_context_is_the_models_own(server):
    """No max_model_len setting: the engine takes the tiny model's 2048 from its config,
    and the gateway reports what the engine says."""
    h = httpx.get(f"{server.url}/health", timeout=10).json()
    assert h["max_model_len"] == MODEL_CONFIG["max_position_embeddings"] == 2048
    assert [e["max_model_len"] for e in h["engines"]] == [2048]


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_over_the_context_is_vllms_400(client, param):
    """vLLM 0.32's rules, passed on as they are: a max_tokens above the context, or a prompt
    that fills it, is a 400 in vLLM's words; a max_tokens that fits the context but not
    beside this prompt is clipped to what the prompt leaves (the answer ends at the context)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="agentloop", messages=MSG, **{param: 2049})
    assert e.value.status_code == 400 and "cannot be greater than" in str(e.value) and "2048" in str(e.value)
    long_prompt = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="agentloop", messages=long_prompt, max_tokens=4)
    assert "maximum context length is 2048" in str(e.value)
    r = client.chat.completions.create(model="agentloop", messages=MSG, **{param: 2048})
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 2048


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_is_compact_and_ends(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    args = dict(model="agentloop", messages=MSG, max_tokens=120, response_format=fmt, temperature=0)
    if stream:
        text, finish = "", None
        for chunk in client.chat.completions.create(stream=True, **args):
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
    else:
        r = client.chat.completions.create(**args)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), ANSWER)
    assert free_whitespace(text) == [], text


def test_json_object_is_compact(client):
    r = client.chat.completions.create(model="agentloop", messages=MSG, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":  # free-form JSON from a random tiny model may not end in 200
        assert isinstance(json.loads(text), dict)
    assert free_whitespace(text, allowed=(",",)) == [], text  # xgrammar 0.2.8 writes ", " in free arrays


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_arguments_are_in_the_template_style(client, stream):
    tools = [{"type": "function", "function": {"name": "describe", "parameters": ANSWER}}]
    args = dict(model="agentloop", messages=MSG, tools=tools, tool_choice="required", max_tokens=120)
    if stream:
        calls: dict[int, str] = {}
        for chunk in client.chat.completions.create(stream=True, **args):
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    calls[tc.index] = calls.get(tc.index, "") + (tc.function.arguments or "")
        arguments = list(calls.values())
    else:
        r = client.chat.completions.create(**args)
        arguments = [c.function.arguments for c in r.choices[0].message.tool_calls]
    assert arguments
    for a in arguments:
        jsonschema.validate(json.loads(a), ANSWER)
        assert free_whitespace(a, allowed=(",", ":")) == [], a


def test_an_engine_that_cannot_start_fails_the_boot_with_vllms_reason(tiny_model, tmp_path):
    """A context above the model's (vLLM refuses it, as it refuses a KV cache too small for
    the context): the boot fails at once with the engine's own words, no endless restarts."""
    with pytest.raises(RuntimeError) as e:
        start_gateway(tmp_path, tiny_model, extra=["--max-model-len", "1000000"], timeout=300)
    assert "before it was ready" in str(e.value) and "max_model_len" in str(e.value), str(e.value)
    proc_log = (tmp_path / "gateway.log").read_text()
    assert "engine boot failed" in proc_log


def test_a_context_whose_kv_cache_does_not_fit_fails_the_boot_with_vllms_reason(tiny_model, tmp_path,
                                                                                  monkeypatch):
    """The tiny model's 2048-token context needs ~1 MB of KV cache; half a MB cannot hold one
    request: the boot fails at once and says so in vLLM's words."""
    monkeypatch.setenv("AGENTLOOP_KVCACHE_SPACE_GIB", str(0.5 / 1024))
    with pytest.raises(RuntimeError) as e:
        start_gateway(tmp_path, tiny_model, timeout=300)
    said = str(e.value)
    assert "before it was ready" in said and "KV cache" in said and "max seq len (2048)" in said, said


def test_langchain_structured_output_invokes_and_streams(server):
    """LangChain's `with_structured_output(method="json_schema")`, as its users call it: the
    compact grammar ends the object, so invoke and stream both parse into the model."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=10)
        population: int = Field(ge=0, le=99999)

    llm = ChatOpenAI(model="agentloop", base_url=server.base_url, api_key="test-key", temperature=0,
                     max_tokens=120, max_retries=0)
    structured = llm.with_structured_output(City, method="json_schema")
    got = structured.invoke("Describe Paris.")
    assert isinstance(got, City)
    streamed = list(structured.stream("Describe Paris."))
    assert streamed and isinstance(streamed[-1], City) and streamed[-1] == got
