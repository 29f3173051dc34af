"""templates/registry.py and the .jinja files: format, transformers parity, round trips.

- A golden rendering pins the chatml-tools format byte for byte (the tiny model
  is trained on exactly this).
- `registry.render` is byte-identical to transformers' `apply_chat_template`
  on the SmolLM2 tokenizer, for every conversation and switch below.
- Prompt/completion consistency: a conversation ending in an assistant turn
  renders as the generation prompt of the conversation before it, plus that
  turn (with thinking on iff the turn carries reasoning).
- A rendered assistant turn parses back (templates/parsing.py) to the same
  reasoning, content and tool calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agentloop.templates import (
    extract_hermes, extract_llama3_json, get_template, list_templates, render, split_reasoning,
    template_text, thinking_enabled,
)

SMOLLM2 = "SmolLM2-135M-Instruct"


def smollm2_dir() -> Path:
    home = os.environ.get("AGENTLOOP_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "agentloop"
    return base / "models" / SMOLLM2


@pytest.fixture(scope="module")
def hf_tokenizer():
    path = smollm2_dir()
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"SmolLM2 tokenizer not found at {path} (set AGENTLOOP_HOME or build the default model)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city — «quoted» & <tagged>",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_BARE = {"name": "get_time", "description": "Time now", "parameters": {"type": "object", "properties": {}}}
TOOLS = [WEATHER, TIME_BARE]


def call(name, arguments, id_="call_1"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


USER = {"role": "user", "content": "What's the weather in Paris?"}
CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hi."}],
    "single_call_dict_args": [USER, {"role": "assistant", "content": None,
                                     "tool_calls": [call("get_weather", {"city": "Paris"})]}],
    "parallel_calls_string_args": [USER, {"role": "assistant", "content": "Checking both.", "tool_calls": [
        call("get_weather", '{"city": "Paris"}', "a"), call("get_time", "{}", "b")]}],
    "tool_results": [USER, {"role": "assistant", "content": "", "tool_calls": [
        call("get_weather", {"city": "Paris"}, "a"), call("get_time", {}, "b")]},
        {"role": "tool", "tool_call_id": "a", "content": "18°C, sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "12:00"},
        {"role": "assistant", "content": "It is 18°C and sunny at noon."}],
    "thinking_last_turn": [USER, {"role": "assistant", "reasoning_content": "The user wants weather.",
                                  "content": None, "tool_calls": [call("get_weather", {"city": "Paris"})]}],
    "reasoning_in_history": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "Easy: 4.", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "reasoning": "Also easy.", "content": "6"}],
    "agent_turn_keeps_reasoning": [USER, {"role": "assistant", "reasoning_content": "Need a tool.", "content": None,
                                          "tool_calls": [call("get_weather", {"city": "Paris"})]},
                                   {"role": "tool", "content": {"temp": 18}},
                                   {"role": "assistant", "reasoning_content": "Got it.", "content": "18 degrees."}],
    "list_content": [{"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "kind."}]},
                     {"role": "user", "content": [{"type": "text", "text": "Line one"}, {"type": "text", "text": "line two"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "Done."}]}],
    "unicode": [{"role": "user", "content": "Traduis « bonjour » en 日本語 👋"},
                {"role": "assistant", "content": "こんにちは", "tool_calls": [call("get_weather", {"city": "Zürich"})]}],
}
SWITCHES = [{}, {"enable_thinking": True}, {"enable_thinking": False}, {"reasoning_effort": "high"},
            {"reasoning_effort": "none"}, {"reasoning_effort": "low", "enable_thinking": False}]


def test_registry_table():
    names = [t.name for t in list_templates()]
    assert names == ["chatml-tools", "llama3-json"]
    chatml = get_template("chatml-tools")
    assert (chatml.tool_parser, chatml.reasoning_parser, chatml.supports_thinking) == ("agentloop_hermes", "agentloop_think", True)
    llama = get_template("llama3-json")
    assert (llama.tool_parser, llama.reasoning_parser, llama.supports_thinking) == ("agentloop_llama3_json", None, False)
    # The joint the engine writes when a thinking budget is spent is the template's own.
    turn = render("chatml-tools", [USER, {"role": "assistant", "reasoning_content": "R.", "content": "C."}])
    assert "R." + chatml.reasoning_end + "\n\nC." in turn and llama.reasoning_end is None
    assert chatml.path.is_file() and template_text("chatml-tools") == chatml.path.read_text()
    with pytest.raises(KeyError, match="chatml-tools"):
        get_template("nope")


def test_chatml_golden_rendering():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sure.", "reasoning_content": "Use the tool.",
         "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_time", "{}")]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "noon"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER, ensure_ascii=False) + "\n"
        + json.dumps({"type": "function", "function": TIME_BARE}, ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nUse the tool.\n</think>\n\nSure.\n"
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert render("chatml-tools", messages, TOOLS, add_generation_prompt=True, enable_thinking=True) == expected


def test_chatml_switches_and_history():
    plain = [{"role": "user", "content": "Hi"}]
    gen = lambda **kw: render("chatml-tools", plain, add_generation_prompt=True, **kw)  # noqa: E731
    assert gen().endswith("<|im_start|>assistant\n")
    for kwargs in SWITCHES:
        assert gen(**kwargs).endswith("<think>\n") is thinking_enabled(kwargs), kwargs
    text = render("chatml-tools", CONVERSATIONS["reasoning_in_history"])
    assert "Easy: 4." not in text and "<think>\nAlso easy.\n</think>\n\n6" in text
    assert "<tools>" not in text and text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert '{"temp": 18}' in render("chatml-tools", CONVERSATIONS["agent_turn_keeps_reasoning"])


def test_llama3_rendering():
    text = render("llama3-json", CONVERSATIONS["tool_results"], TOOLS, date_string="01 Jan 2025")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n<|eot_id|>")
    assert '"parameters": dictionary of argument names and values}' in text
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_time", "parameters": {}}<|eot_id|>') in text
    assert text.count("<|start_header_id|>ipython<|end_header_id|>\n\n") == 2
    assert text.index("What's the weather in Paris?") > text.index('"name": "get_weather"')  # tools precede the question
    no_user = render("llama3-json", [{"role": "system", "content": "S"}], TOOLS, date_string="x")
    assert '"get_time"' in no_user and no_user.endswith("S<|eot_id|>")  # no user turn: tools go to the system turn


@pytest.mark.parametrize("name", ["chatml-tools", "llama3-json"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=list(CONVERSATIONS))
def test_matches_transformers_apply_chat_template(hf_tokenizer, name, conv):
    messages = CONVERSATIONS[conv]
    for tools in (None, TOOLS):
        for kwargs in SWITCHES:
            for gen in (False, True):
                ours = render(name, messages, tools, add_generation_prompt=gen, date_string="26 Jul 2024", **kwargs)
                theirs = hf_tokenizer.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=gen,
                    chat_template=template_text(name), date_string="26 Jul 2024", **kwargs)
                assert ours == theirs, (tools is not None, kwargs, gen)


def _reasoning(message):
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str):
            return message[key]
    return None


def _expected_calls(message):
    out = []
    for tc in message.get("tool_calls") or []:
        args = tc["function"]["arguments"]
        args = json.loads(args) if isinstance(args, str) else args
        out.append((tc["function"]["name"], args))
    return out


def _text(content):
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if p.get("type") == "text")
    return content or ""


ENDING_IN_ASSISTANT = [c for c, m in CONVERSATIONS.items() if m[-1]["role"] == "assistant"]


@pytest.mark.parametrize("conv", ENDING_IN_ASSISTANT)
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
def test_chatml_prompt_completion_split_and_round_trip(conv, tools):
    messages = CONVERSATIONS[conv]
    last = messages[-1]
    thinking = _reasoning(last) is not None
    prompt = render("chatml-tools", messages[:-1], tools, add_generation_prompt=True, enable_thinking=thinking)
    full = render("chatml-tools", messages, tools, enable_thinking=thinking)
    assert full.startswith(prompt)
    completion = full[len(prompt):]
    assert completion.endswith("<|im_end|>\n")
    reasoning, rest = split_reasoning(completion[: -len("<|im_end|>\n")], thinking)
    content, calls = extract_hermes(rest)
    assert reasoning == _reasoning(last)
    assert content == _text(last.get("content"))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == _expected_calls(last)


@pytest.mark.parametrize("conv", ENDING_IN_ASSISTANT)
def test_llama3_prompt_completion_split_and_round_trip(conv):
    messages = CONVERSATIONS[conv]
    last = messages[-1]
    prompt = render("llama3-json", messages[:-1], TOOLS, add_generation_prompt=True, date_string="x")
    full = render("llama3-json", messages, TOOLS, date_string="x")
    assert full.startswith(prompt) and full.endswith("<|eot_id|>")
    content, calls = extract_llama3_json(full[len(prompt): -len("<|eot_id|>")])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == _expected_calls(last)
    if not calls:  # a calling turn renders only its calls
        assert content == _text(last.get("content"))


def test_generation_block_marks_assistant_text(hf_tokenizer):
    """The {% generation %} blocks let transformers mask exactly the assistant text."""
    messages = CONVERSATIONS["single_call_dict_args"]
    out = hf_tokenizer.apply_chat_template(messages, tools=TOOLS, chat_template=template_text("chatml-tools"),
                                           tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant = hf_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert assistant == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
