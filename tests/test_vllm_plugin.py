"""serve/inside_vllm/parsers.py inside vLLM 0.32, in-process (no server).

Drives the parsers with the real SmolLM2 tokenizer and real ChatCompletionRequests,
token by token the way vLLM's chat server does (text and ids per delta, the stop
token's id in the last delta but not its text): the individual ToolParser /
ReasoningParser methods, then the composed parser vLLM builds from our names
(ParserManager -> DelegatingParser), streaming against non-streaming, including
tool_choice "required"/named with thinking on and off.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import xgrammar

pytest.importorskip("vllm")

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.parser.parser_manager import ParserManager  # noqa: E402
from vllm.reasoning import ReasoningParserManager  # noqa: E402
from vllm.tool_parsers import ToolParserManager  # noqa: E402

import agentloop.serve.inside_vllm.call_grammar as call_grammar  # noqa: E402
import agentloop.serve.inside_vllm.parsers as plugin  # noqa: E402
from agentloop.templates import extract_hermes, extract_llama3_json, render, split_reasoning  # noqa: E402

pytestmark = pytest.mark.engine  # loads a real model or vLLM itself (README, "Tests")


@pytest.fixture(scope="module")
def tok():
    home = os.environ.get("AGENTLOOP_HOME")
    path = (Path(home).expanduser() if home else Path.home() / ".cache" / "agentloop") / "models" / "SmolLM2-135M-Instruct"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"SmolLM2 tokenizer not found at {path} (set AGENTLOOP_HOME or build the default model)")
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(path))


EOS = "<|im_end|>"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris, and the time?"}]


def call(name, args_json):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args_json}}}\n</tool_call>'


W = call("get_weather", '{"city": "Paris"}')
T = call("get_time", "{}")
# (id, thinking, output) -- what the model writes after the generation prompt.
OUTPUTS = [
    ("plain", False, "Hello! 1 < 2 and <b>bold</b> a<tool"),
    ("one_call", False, W),
    ("parallel_with_text", False, "Sure, checking both.\n" + W + "\n" + T),
    ("empty_args", False, T),
    ("nested_braces", False, call("get_weather", '{"city": "Paris }", "extra": {"a": {"b": "}}"}}}')),
    ("unicode", False, "Voilà 日本 👍\n" + call("get_weather", '{"city": "Zürich"}')),
    ("text_after_call", False, W + "\nDone."),
    ("broken_json", False, "Hmm\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>"),
    ("cut_off", False, "Ok\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par"),
    ("spontaneous_think", False, "<think>\nmaybe " + T + "\n</think>\n\n" + W),
    ("think_content", True, "The user says hi.\n</think>\n\nHello!"),
    ("think_calls", True, "Need both tools, e.g. " + T + ".\n</think>\n\nOn it.\n" + W + "\n" + T),
    ("think_unclosed", True, "Still thinking about </thi"),
]


def request(thinking, **kw):
    args = dict(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="auto",
                chat_template_kwargs={"enable_thinking": thinking})
    args.update(kw)
    return ChatCompletionRequest(**args)


def prompt_ids(tok, thinking):
    prompt = render("chatml-tools", MESSAGES, TOOLS, add_generation_prompt=True, enable_thinking=thinking)
    return tok.encode(prompt, add_special_tokens=False)


def output_ids(tok, text, eos=True):
    """The generated ids; without the end-of-turn token when max_tokens cut the output."""
    return tok.encode(text, add_special_tokens=False) + ([tok.convert_tokens_to_ids(EOS)] if eos else [])


def token_deltas(tok, ids):
    """(delta_text, [id]) per token, as vLLM streams: incomplete UTF-8 is held back, stop-token text never shown."""
    out, prev = [], ""
    for k, token in enumerate(ids):
        text = tok.decode(ids[: k + 1], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            out.append(("", [token]))
            continue
        assert text.startswith(prev)
        out.append((text[len(prev):], [token]))
        prev = text
    return out


def expected(thinking, text):
    """What the pure parsers say (tests/test_parsers.py pins those); the plugin's
    Hermes parser drops a block the output leaves open (a cut-off call)."""
    reasoning, rest = split_reasoning(text, thinking)
    content, calls = extract_hermes(rest, drop_unclosed=True)
    return reasoning, content, [(c.name, c.arguments) for c in calls]


def fold(deltas):
    """Assemble stream deltas as a client does; check the per-call delta contract."""
    reasoning = "".join(d.reasoning or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls:
            if tc.index not in calls:  # first delta of a call carries everything identifying it
                assert tc.id and tc.type == "function" and tc.function and tc.function.name, tc
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "args": ""}
            else:
                assert tc.id is None and (tc.function is None or tc.function.name is None), tc
            calls[tc.index]["args"] += (tc.function.arguments or "") if tc.function else ""
    assert sorted(calls) == list(range(len(calls)))
    ids = [c["id"] for c in calls.values()]
    assert len(set(ids)) == len(ids)
    for c in calls.values():
        assert isinstance(json.loads(c["args"]), dict)
    return reasoning or None, content, [(calls[i]["name"], calls[i]["args"]) for i in sorted(calls)]


def test_register_is_idempotent_and_plugin_file_loads_by_path(monkeypatch):
    plugin.register()
    plugin.register()
    assert ToolParserManager.get_tool_parser("agentloop_hermes") is plugin.AgentloopHermesToolParser
    assert ToolParserManager.get_tool_parser("agentloop_llama3_json") is plugin.AgentloopLlama3JsonToolParser
    assert ReasoningParserManager.get_reasoning_parser("agentloop_think") is plugin.AgentloopThinkReasoningParser
    # --tool-parser-plugin <file>: imported by path (agentloop is installed where the engine runs).
    try:
        ToolParserManager.import_tool_parser(str(Path(plugin.__file__)))
        by_path = ToolParserManager.get_tool_parser("agentloop_hermes")
        assert by_path is not plugin.AgentloopHermesToolParser and by_path.__module__ == "parsers"
        assert by_path.parser_cls.extract(T)[1][0].name == "get_time"
    finally:
        sys.modules.pop("parsers", None)
        plugin.register()
    assert ToolParserManager.get_tool_parser("agentloop_hermes") is plugin.AgentloopHermesToolParser


TOOL_CASES = [c for c in OUTPUTS if not c[1]]


@pytest.mark.parametrize("case", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_tool_parser_non_streaming_and_streaming(tok, case):
    _, thinking, text = case
    req = request(thinking)
    exp_reasoning, exp_content, exp_calls = expected(thinking, text)

    # Non-streaming, on what the reasoning parser left (vLLM splits reasoning first).
    rest = split_reasoning(text, False)[1]
    info = plugin.AgentloopHermesToolParser(tok, req.tools).extract_tool_calls(rest, req)
    # "called" also when a cut-off call was dropped, so vLLM takes our content over the raw text.
    assert info.tools_called == (bool(exp_calls) or exp_content != rest)
    assert [(c.function.name, c.function.arguments) for c in info.tool_calls] == exp_calls
    assert all(c.id and c.type == "function" for c in info.tool_calls)
    assert len({c.id for c in info.tool_calls}) == len(info.tool_calls)
    assert (info.content or "") == exp_content

    # Streaming, token by token, with previous/current/delta text and ids as vLLM passes them.
    parser = plugin.AgentloopHermesToolParser(tok, req.tools)
    ids = output_ids(tok, text)
    deltas, prev_text, prev_ids = [], "", []
    for delta_text, delta_ids in token_deltas(tok, ids):
        cur_text, cur_ids = prev_text + delta_text, prev_ids + delta_ids
        dm = parser.extract_tool_calls_streaming(prev_text, cur_text, delta_text, prev_ids, cur_ids, delta_ids, req)
        if dm is not None:
            deltas.append(dm)
        prev_text, prev_ids = cur_text, cur_ids
    assert fold(deltas) == (exp_reasoning, exp_content, exp_calls)
    if exp_calls:
        assert "<tool_call>" not in exp_content and "</tool_call>" not in exp_content
        assert parser.get_remaining_unstreamed_args() == ""  # vLLM's end-of-stream top-up adds nothing


def test_llama3_tool_parser(tok):
    req = request(False)
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
    info = plugin.AgentloopLlama3JsonToolParser(tok, req.tools).extract_tool_calls(text, req)
    exp = [(c.name, c.arguments) for c in extract_llama3_json(text)[1]]
    assert [(c.function.name, c.function.arguments) for c in info.tool_calls] == exp and len(exp) == 2
    parser, deltas, prev = plugin.AgentloopLlama3JsonToolParser(tok, req.tools), [], ""
    for delta_text, delta_ids in token_deltas(tok, output_ids(tok, text)):
        dm = parser.extract_tool_calls_streaming(prev, prev + delta_text, delta_text, [], [], delta_ids, req)
        prev += delta_text
        deltas += [dm] if dm else []
    assert fold(deltas) == (None, "", exp)


THINK_CASES = [c for c in OUTPUTS if c[1]]


@pytest.mark.parametrize("case", THINK_CASES, ids=[c[0] for c in THINK_CASES])
def test_reasoning_parser_frontend(tok, case):
    _, thinking, text = case
    req = request(thinking)
    reasoning, rest = split_reasoning(text, thinking)
    kwargs = {"chat_template_kwargs": {"enable_thinking": thinking}}
    assert plugin.AgentloopThinkReasoningParser(tok, **kwargs).extract_reasoning(text, req) == (reasoning, rest or None)

    parser = plugin.AgentloopThinkReasoningParser(tok, **kwargs)
    assert parser.is_reasoning_end(prompt_ids(tok, thinking)) is False
    parser.adjust_initial_state_from_prompt(prompt_ids(tok, thinking))
    ids = output_ids(tok, text)
    got_reasoning, handed_over, prev_ids = "", None, []
    for k, (delta_text, delta_ids) in enumerate(token_deltas(tok, ids)):
        if handed_over is not None:  # after the hand-over vLLM sends the text to the tool parser
            handed_over += delta_text
            continue
        prev_ids = prev_ids + delta_ids
        dm = parser.extract_reasoning_streaming("", "", delta_text, [], prev_ids, delta_ids)
        got_reasoning += (dm.reasoning or "") if dm else ""
        if parser.is_reasoning_end_streaming(prev_ids, delta_ids):
            handed_over = (dm.content or "") if dm else ""
            assert parser.extract_content_ids(delta_ids) is not None
        else:
            assert not (dm and dm.content)  # no content may bypass the tool phase
    assert got_reasoning == reasoning
    assert (handed_over or "") == rest
    assert "</think>" not in (handed_over or "")


@pytest.mark.parametrize("thinking", [True, False])
def test_reasoning_parser_engine_gate(tok, thinking):
    """The structured-output gate: opens on the prompt when thinking is off, else right after `</think>`."""
    kwargs = {"chat_template_kwargs": {"enable_thinking": thinking}}
    engine = plugin.AgentloopThinkReasoningParser(tokenizer=tok, **kwargs)  # as StructuredOutputManager builds it
    prompt = prompt_ids(tok, thinking)
    assert engine.is_reasoning_end(prompt) is (not thinking)
    req = request(thinking, tool_choice="required")
    frontend = ParserManager.get_parser("agentloop_hermes", "agentloop_think", True, tokenizer=tok)(
        tok, req.tools, chat_template_kwargs=kwargs["chat_template_kwargs"])
    assert req.resolve_reasoning_ended(frontend, prompt) is (not thinking)  # what the engine is told
    if not thinking:
        return
    text = "Plan: compare </thin and <think> tags.\nok\n</think>\n\n[{\"name\": \"get_time\", \"parameters\": {}}]"
    out = tok.encode(text, add_special_tokens=False)
    close_end = next(k for k in range(1, len(out) + 1) if "</think>" in tok.decode(out[:k]))
    opened = [k for k in range(len(out)) if engine.is_reasoning_end_streaming(prompt + out[: k + 1], out[k: k + 1])]
    assert opened == [close_end - 1]  # exactly the token completing the tag, once
    for n in (2, 3, 5):  # speculative decoding: several tokens per step
        steps = [k for k in range(0, len(out), n) if engine.is_reasoning_end_streaming(prompt + out[: k + n], out[k: k + n])]
        assert steps == [(close_end - 1) // n * n]
    assert engine.extract_content_ids(out) == out[close_end:]
    assert tok.decode(engine.extract_content_ids(out)).lstrip("\n").startswith("[{")
    assert plugin.AgentloopThinkReasoningParser(tok).is_reasoning_end(prompt_ids(tok, False))  # no kwargs at all


def compose(tok, tool_parser="agentloop_hermes", reasoning_parser="agentloop_think"):
    return ParserManager.get_parser(tool_parser, reasoning_parser, enable_auto_tools=True, tokenizer=tok)


def run_both(tok, parser_cls, req, thinking, text, eos=True):
    """(non-streaming, streaming) results of vLLM's composed parser on one output."""
    kwargs = {"enable_thinking": thinking}
    ids = output_ids(tok, text, eos)
    parser = parser_cls(tok, req.tools, chat_template_kwargs=kwargs)
    parser.adjust_request(req)
    reasoning, content, calls = parser.parse(tok.decode(ids, skip_special_tokens=True), req, enable_auto_tools=True,
                                             model_output_token_ids=ids)
    assert all(c.id is None or c.id for c in calls or [])
    non_stream = (reasoning or None, content or "", [(c.name, c.arguments) for c in calls or []])
    streamer, deltas = parser_cls(tok, req.tools, chat_template_kwargs=kwargs), []
    pids = prompt_ids(tok, thinking)
    pieces = token_deltas(tok, ids)
    for k, (delta_text, delta_ids) in enumerate(pieces):
        dm = streamer.parse_delta(delta_text, delta_ids, req, prompt_token_ids=pids, finished=k == len(pieces) - 1)
        deltas += [dm] if dm else []
    return non_stream, fold(deltas)


@pytest.mark.parametrize("case", OUTPUTS, ids=[c[0] for c in OUTPUTS])
def test_composed_parser_stream_equals_non_stream(tok, case):
    _, thinking, text = case
    non_stream, stream = run_both(tok, compose(tok), request(thinking), thinking, text)
    exp_reasoning, exp_content, exp_calls = expected(thinking, text)
    assert stream == non_stream
    assert non_stream[2] == exp_calls and non_stream[0] == exp_reasoning
    if exp_calls:
        assert non_stream[1] == exp_content and "<tool_call>" not in stream[1]


def test_composed_parser_without_tools_passes_text_through(tok):
    text = "<think>\nodd\n</think>\n\nHi " + W
    req = ChatCompletionRequest(model="m", messages=MESSAGES, chat_template_kwargs={"enable_thinking": False})
    non_stream, stream = run_both(tok, compose(tok), req, False, text)
    assert non_stream == stream == (None, text, [])


CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
FORCED = [
    ("required", False, CALL_PARIS + "\n" + CALL_TIME, [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    ("required", True, "Two tools.\n</think>\n\n" + CALL_PARIS, [("get_weather", '{"city": "Paris"}')]),
    ("named", False, CALL_PARIS, [("get_weather", '{"city": "Paris"}')]),
    ("named", True, "Use get_weather.\n</think>\n\n" + CALL_PARIS, [("get_weather", '{"city": "Paris"}')]),
]


@pytest.mark.parametrize("choice,thinking,text,calls", FORCED, ids=[f"{c[0]}-thinking={c[1]}" for c in FORCED])
def test_forced_tool_choice_with_and_without_thinking(tok, choice, thinking, text, calls):
    """Forced calls are constrained by vLLM's "hermes" structural tag (our own block
    format, name and arguments schema), gated by our reasoning parser; both paths read them."""
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_weather"}}
    req = request(thinking, tool_choice=tool_choice)
    parser_cls = compose(tok)
    adjusted = parser_cls(tok, req.tools, chat_template_kwargs={"enable_thinking": thinking}).adjust_request(req)
    tag = json.loads(adjusted.structured_outputs.structural_tag)
    # The whole call is constrained: the block's opening names the tool, the content is its schema.
    tags = tag["format"]["tags"]
    assert tags and all(t["begin"].startswith("<tool_call>") for t in tags)
    weather = next(t for t in tags if '"get_weather"' in t["begin"])
    assert accepts(weather["content"], '{"city": "Paris"}') and not accepts(weather["content"], '{"town": "Paris"}')
    if choice == "named":
        assert {t["begin"].split('"name": "')[1].split('"')[0] for t in tags} == {"get_weather"}
    else:  # two calls are joined as the template joins them, or the grammar stops after one
        assert tag["format"]["separator"] == "\n"
    assert adjusted.structured_outputs.json is None  # not vLLM's JSON-list format
    (r1, _, c1), (r2, _, c2) = run_both(tok, parser_cls, req, thinking, text)
    assert [(n, json.loads(a)) for n, a in c1] == [(n, json.loads(a)) for n, a in calls]
    assert [(n, json.loads(a)) for n, a in c2] == [(n, json.loads(a)) for n, a in calls]
    assert r1 == r2 == (text.split("\n</think>")[0] if thinking else None)


# ------------------------------------------------------ constrained calls

# Outputs cut off by max_tokens (no end-of-turn token): what the grammar lets
# the model write, stopped anywhere. (tool_choice, output, calls expected)
CUT = [
    ("auto", "Sure.\n" + CALL_PARIS[:30], []),
    ("auto", "Sure.\n<tool", []),
    ("auto", CALL_PARIS + "\n" + CALL_TIME[:-4], [("get_weather", '{"city": "Paris"}')]),
    ("required", "<tool", []),
    ("required", CALL_PARIS[:40], []),
    ("required", CALL_PARIS[:-1], []),  # the body is whole, only `</tool_call>` is cut: not a call yet
    ("required", CALL_PARIS + CALL_TIME[:20], [("get_weather", '{"city": "Paris"}')]),
    ("named", CALL_PARIS[:25], []),
]


@pytest.mark.parametrize("choice,text,calls", CUT, ids=[f"{c[0]}-{i}" for i, c in enumerate(CUT)])
def test_cut_off_call_is_neither_a_call_nor_content(tok, choice, text, calls):
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice
    req = request(False, tool_choice=tool_choice)
    non_stream, stream = run_both(tok, compose(tok), req, False, text, eos=False)
    assert non_stream == stream
    _, content, got = non_stream
    assert [(n, json.loads(a)) for n, a in got] == [(n, json.loads(a)) for n, a in calls]
    assert "<" not in content
    if choice != "auto":
        assert content == ""  # a forced call has no text around it
    else:
        assert content == (text.split("\n")[0] if text.startswith("Sure.") else "")


BAD_SCHEMAS = [
    ("ref_to_nowhere", {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "$defs"),
    ("unknown_type", {"type": "object", "properties": {"a": {"type": "foo"}}}, 'Unsupported type "foo"'),
    ("lookbehind_pattern", {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}},
     "Lookbehind"),
    ("bfcl_dict", {"type": "dict", "properties": {}}, '"type": "dict"'),
    ("not_an_object", {"type": "string"}, '"type": "string"'),
    ("min_over_max", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 2, "maximum": 1}}},
     "minimum greater than maximum"),
]


@pytest.mark.parametrize("name,schema,reason", BAD_SCHEMAS, ids=[b[0] for b in BAD_SCHEMAS])
@pytest.mark.parametrize("choice", ["auto", "required"])
def test_unusable_schema_is_a_400_naming_the_tool(tok, name, schema, reason, choice):
    tools = [TOOLS[0], {"type": "function", "function": {"name": "broken", "parameters": schema}}]
    req = request(False, tools=tools, tool_choice=choice)
    with pytest.raises(VLLMValidationError) as e:
        compose(tok)(tok, req.tools, chat_template_kwargs={}).adjust_request(req)
    assert "'broken'" in str(e.value) and reason in str(e.value)
    err = create_error_response(e.value).error
    assert err.code == 400 and err.param == "tools[1].function.parameters"


def accepts(fmt: dict, text: str) -> bool:
    """Whether one structural-tag format (as the engine compiles it) matches `text` whole."""
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgrammar.Grammar.from_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))
    return _is_grammar_accept_string(grammar, text)


def test_call_grammar_arguments_are_objects_in_the_template_style(tok):
    """JSON that ends: arguments are objects written exactly as the template writes them
    (", " and ": "), with no other whitespace anywhere between tokens."""
    tools = [{"type": "function", "function": {"name": "anything"}},  # no parameters at all
             {"type": "function", "function": {"name": "empty", "parameters": {}}},
             {"type": "function", "function": {"name": "untyped", "parameters": {"properties": {"a": {"type": "integer"}}}}},
             TOOLS[0]]
    for choice in ("auto", "required", {"type": "function", "function": {"name": "untyped"}}):
        req = request(False, tools=tools, tool_choice=choice)
        tag = compose(tok)(tok, req.tools, chat_template_kwargs={}).adjust_request(req).structured_outputs.structural_tag
        contents = {t["begin"].split('"name": "')[1].split('"')[0]: t["content"] for t in json.loads(tag)["format"]["tags"]}
        assert contents and all(c["type"] == "grammar" for c in contents.values())
        for name, fmt in contents.items():
            assert not accepts(fmt, "5") and not accepts(fmt, '"x"')  # always an object
        if "untyped" in contents:
            fmt = contents["untyped"]
            assert accepts(fmt, '{"a": 1}') and accepts(fmt, "{}")
            assert accepts(fmt, '{"a": -9007199254740991}') and not accepts(fmt, '{"a": 11111111111111111111}')
            for loose in ('{"a":1}', '{ "a": 1}', '{"a": 1 }', '{"a":  1}', '{"a": 1}\n', '{\n"a": 1}'):
                assert not accepts(fmt, loose), loose
        if "get_weather" in contents:
            fmt = contents["get_weather"]
            assert accepts(fmt, '{"city": "New York"}')  # spaces inside a string are the value's own
            assert not accepts(fmt, '{"city": "Paris", "extra": 1}') and not accepts(fmt, "{}")
        if "anything" in contents:
            assert accepts(contents["anything"], '{"k": [1, 2], "o": {"x": null}}')
        if choice == "auto":  # free text around calls never holds a stray closing tag
            assert json.loads(tag)["format"]["excludes"] == ["</tool_call>"]
    # A response_format OR-ed into an auto request is the client's own constraint, written compact
    # as vLLM writes response_format elsewhere (disable_any_whitespace).
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    req = request(False, tool_choice="auto",
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    tag = json.loads(compose(tok)(tok, req.tools, chat_template_kwargs={}).adjust_request(req).structured_outputs.structural_tag)
    (tools_part, output_part) = tag["format"]["elements"]
    assert output_part["type"] == "grammar"
    assert accepts(output_part, '{"answer":"a b"}') and not accepts(output_part, '{"answer": "a b"}')
    assert not accepts(output_part, '{"answer":"a"}\n') and not accepts(output_part, '{"other":"a"}')
    assert all(t["content"]["type"] == "grammar" for t in tools_part["tags"])


def test_required_keys_are_declared_for_the_grammar():
    """xgrammar writes declared properties only: a required-but-undeclared key (valid JSON
    Schema, any value) is declared as `{}`, or the grammar could only write invalid objects."""
    schema = {"type": "object", "properties": {"population": {"type": "object", "required": ["adults"]},
                                               "closed": {"type": "object", "required": ["x"],
                                                          "additionalProperties": False}},
              "required": ["population"]}
    got = call_grammar.object_schema(schema)
    assert got["properties"]["population"]["properties"] == {"adults": {}}
    assert "properties" not in got["properties"]["closed"]  # unsatisfiable as sent: left alone
    assert call_grammar.object_schema({"properties": {}})["type"] == "object"
    assert call_grammar.object_schema(None) == call_grammar.object_schema(True) == {"type": "object"}
    assert schema["properties"]["population"] == {"type": "object", "required": ["adults"]}  # not mutated


def test_schema_check_is_cached():
    call_grammar._schema_problem.cache_clear()
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "enum": [f"v{j}" for j in range(20)]}
                                            for i in range(40)}}
    tools = [ChatCompletionRequest(model="m", messages=MESSAGES, tools=[
        {"type": "function", "function": {"name": "big", "parameters": big}}]).tools[0]]
    for _ in range(3):
        call_grammar.check_tool_schemas(tools)
    info = call_grammar._schema_problem.cache_info()
    assert (info.misses, info.hits) == (1, 2)


@pytest.mark.parametrize("setting, expected", [(None, 1), ("0", 2)], ids=["default-dedupe", "dedupe-off"])
def test_repeated_call_is_dropped_unless_turned_off(tok, monkeypatch, setting, expected):
    """The serving parser drops a verbatim repeat of a call (AGENTLOOP_DEDUPE_TOOL_CALLS, on by
    default), streamed and not; =0 keeps every call the model wrote."""
    if setting is None:
        monkeypatch.delenv("AGENTLOOP_DEDUPE_TOOL_CALLS", raising=False)
    else:
        monkeypatch.setenv("AGENTLOOP_DEDUPE_TOOL_CALLS", setting)
    req = request(False)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    text = call + "\n" + call
    info = plugin.AgentloopHermesToolParser(tok, req.tools).extract_tool_calls(text, req)
    assert [c.function.name for c in info.tool_calls] == ["get_weather"] * expected
    parser, deltas, prev = plugin.AgentloopHermesToolParser(tok, req.tools), [], ""
    for delta_text, delta_ids in token_deltas(tok, output_ids(tok, text)):
        dm = parser.extract_tool_calls_streaming(prev, prev + delta_text, delta_text, [], [], delta_ids, req)
        prev += delta_text
        deltas += [dm] if dm else []
    assert fold(deltas)[2] == [(c.function.name, c.function.arguments) for c in info.tool_calls]
