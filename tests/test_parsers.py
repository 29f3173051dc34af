"""templates/parsing.py: recorded-style outputs, parsed one-shot and streamed.

Every output is fed at every possible split point (two deltas) and char by
char; the streamed result must equal the one-shot result (which must equal the
expected value written here), content must never carry a valid call's markup,
and each call's argument fragments must concatenate to its JSON arguments.
"""

from __future__ import annotations

import json

import pytest

from agentloop.templates.parsing import (
    HermesToolParser, JsonScanner, Llama3JsonToolParser, TextDelta, ThinkStreamSplitter, ToolCall,
    ToolCallArgs, ToolCallStart, assemble, parse_call_object, split_reasoning, thinking_enabled,
)


def tc(name: str, args: dict | None = None) -> ToolCall:
    return ToolCall(name, json.dumps(args or {}, ensure_ascii=False))


def call(name: str, args_json: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args_json}}}\n</tool_call>'


W = call("get_weather", '{"city": "Paris"}')
T = call("get_time", '{"tz": "UTC"}')

# (id, output, expected content, expected calls)
HERMES = [
    ("plain", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("one_call", W, "", [tc("get_weather", {"city": "Paris"})]),
    ("parallel", W + "\n" + T, "", [tc("get_weather", {"city": "Paris"}), tc("get_time", {"tz": "UTC"})]),
    ("empty_args", call("now", "{}"), "", [tc("now")]),
    ("missing_args", '<tool_call>\n{"name": "now"}\n</tool_call>', "", [tc("now")]),
    ("string_args", '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', "", [tc("f", {"a": 1})]),
    ("parameters_key", '<tool_call>{"name": "f", "parameters": {"a": [1, 2]}}</tool_call>', "", [tc("f", {"a": [1, 2]})]),
    ("nested_braces_in_strings",
     call("run", '{"code": "def f():\\n    return {\\"a\\": \\"}\\"}", "opts": {"x": {"y": [1, {"z": "}}"}]}}}'),
     "", [tc("run", {"code": 'def f():\n    return {"a": "}"}', "opts": {"x": {"y": [1, {"z": "}}"}]}}})]),
    ("close_tag_inside_string", call("echo", '{"text": "a </tool_call> b"}'), "", [tc("echo", {"text": "a </tool_call> b"})]),
    ("unicode", "Voilà 👍\n" + call("tr", '{"q": "naïve café 日本", "e": "\\u00e9"}'),
     "Voilà 👍", [tc("tr", {"q": "naïve café 日本", "e": "é"})]),
    ("compact_json", '<tool_call>{"name":"f","arguments":{"a":1,"b":"x"}}</tool_call>', "", [tc("f", {"a": 1, "b": "x"})]),
    ("text_before_and_after", "Let me check.\n" + W + "\nI asked for the weather.",
     "Let me check.\nI asked for the weather.", [tc("get_weather", {"city": "Paris"})]),
    ("text_between_calls", "A\n" + W + "\nthen\n" + T + "\n", "A\nthen", [tc("get_weather", {"city": "Paris"}), tc("get_time", {"tz": "UTC"})]),
    ("content_keeps_its_own_newline", "Hello\n\n" + W, "Hello\n", [tc("get_weather", {"city": "Paris"})]),
    ("literal_lt_in_content", "if a < b and c <tool or <t then x<y\n", "if a < b and c <tool or <t then x<y\n", []),
    ("partial_tag_at_end", "almost a call <tool_ca", "almost a call <tool_ca", []),
    ("broken_json", "Hi\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": }\n</tool_call>",
     "Hi\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": }\n</tool_call>", []),
    ("broken_then_valid", "<tool_call>{oops}</tool_call>\n" + W,
     "<tool_call>{oops}</tool_call>", [tc("get_weather", {"city": "Paris"})]),
    ("valid_then_broken", W + "\n<tool_call>not json</tool_call>",
     "\n<tool_call>not json</tool_call>", [tc("get_weather", {"city": "Paris"})]),
    ("not_a_call_object", '<tool_call>["f", {}]</tool_call>', '<tool_call>["f", {}]</tool_call>', []),
    ("nan_rejected", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ("cut_off_call", "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par",
     "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par", []),
    ("complete_json_missing_close", "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n",
     "Sure.", [tc("f")]),
    ("partial_close_at_end", '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_c', "", [tc("f", {"a": 1})]),
    ("whitespace_after_last_call", W + "\n\n  \n", "", [tc("get_weather", {"city": "Paris"})]),
]

LLAMA = [
    ("plain", "Paris is the capital.", "Paris is the capital.", []),
    ("one_call", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [tc("get_weather", {"city": "Paris"})]),
    ("two_calls", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', "", [tc("a", {"x": 1}), tc("b")]),
    ("newline_separated", '{"name": "a", "parameters": {}}\n{"name": "b", "parameters": {"s": "}"}}', "", [tc("a"), tc("b", {"s": "}"})]),
    ("python_tag", '<|python_tag|>{"name": "a", "parameters": {"q": "ü"}}', "", [tc("a", {"q": "ü"})]),
    ("leading_ws_arguments_key", '\n {"name": "a", "arguments": {"k": [1, {"z": null}]}}', "", [tc("a", {"k": [1, {"z": None}]})]),
    ("text_after_call", '{"name": "a", "parameters": {}}\nDone.', "Done.", [tc("a")]),
    ("object_not_a_call", '{"a": 1} is a JSON object', '{"a": 1} is a JSON object', []),
    ("broken_first", '{"name": "a", "parameters": {"x": }}', '{"name": "a", "parameters": {"x": }}', []),
    ("valid_then_broken", '{"name": "a", "parameters": {}}; {"name": "b", "param', '{"name": "b", "param', [tc("a")]),
    ("cut_off", '<|python_tag|>{"name": "a", "parameters": {"x": "ab', '<|python_tag|>{"name": "a", "parameters": {"x": "ab', []),
    ("tag_then_text", "<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("lt_text", "<|python", "<|python", []),
    ("semicolon_then_text", '{"name": "a", "parameters": {}}; and more', "and more", [tc("a")]),
]

THINK = [
    # (id, thinking, output, reasoning, content)
    ("on_content", True, "The user greets me.\n</think>\n\nHello!", "The user greets me.", "Hello!"),
    ("on_calls", True, "Need weather.\n</think>\n\n" + W, "Need weather.", W),
    ("on_markup_inside", True, "Maybe " + W + " first?\n</think>\n\nNo call needed.", "Maybe " + W + " first?", "No call needed."),
    ("on_repeated_opener", True, "<think>\nhmm\n</think>\n\nok", "hmm", "ok"),
    ("on_empty_reasoning", True, "\n</think>\n\nok", "", "ok"),
    ("on_no_newlines", True, "r</think>c", "r", "c"),
    ("on_one_newline_after", True, "r\n</think>\n\n\nc", "r", "\nc"),
    ("on_unclosed", True, "still thinking </thi", "still thinking </thi", ""),
    ("on_lt_in_reasoning", True, "a < b <\n/think> c\n</think>\n\nd", "a < b <\n/think> c", "d"),
    ("off_plain", False, "Hello <think> there", None, "Hello <think> there"),
    ("off_leading_think", False, "<think>\nquick thought\n</think>\n\nHello", "quick thought", "Hello"),
    ("off_partial_opener", False, "<thin", None, "<thin"),
    ("off_lt", False, "<b>bold</b>", None, "<b>bold</b>"),
    ("unicode", True, "café ☕\n</think>\n\n日本", "café ☕", "日本"),
]


def splits(text: str):
    """Every two-delta cut, then char by char."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


def run_tool_stream(cls, chunks):
    parser = cls()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def check_events(events, calls):
    """Each call: one start, then args, indices 0..n-1 in order, args valid JSON."""
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [e.index for e in starts] == list(range(len(calls)))
    for e in events:
        if isinstance(e, ToolCallArgs):
            first = next(i for i, s in enumerate(events) if isinstance(s, ToolCallStart) and s.index == e.index)
            assert first < events.index(e)
    for c in calls:
        assert isinstance(json.loads(c.arguments), dict)


@pytest.mark.parametrize("cls,case", [(HermesToolParser, c) for c in HERMES] + [(Llama3JsonToolParser, c) for c in LLAMA],
                         ids=[f"hermes-{c[0]}" for c in HERMES] + [f"llama3-{c[0]}" for c in LLAMA])
def test_tool_parser_streaming_equals_one_shot(cls, case):
    _, text, content, calls = case
    assert cls.extract(text) == (content, calls)
    for chunks in splits(text):
        events = run_tool_stream(cls, chunks)
        assert assemble(events) == (content, calls), chunks
        check_events(events, calls)
        if calls and cls is HermesToolParser and "not json" not in text and "oops" not in text:
            streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
            assert "<tool_call>" not in streamed and "</tool_call>" not in streamed


# What `drop_unclosed=True` (the vLLM plugin's setting, where only a cut-off
# output can leave a block open) changes; every other HERMES case is unchanged.
HERMES_DROP_UNCLOSED = {
    "cut_off_call": ("Sure.", []),
    "complete_json_missing_close": ("Sure.", []),  # a call counts once </tool_call> is written
    "partial_close_at_end": ("", []),
    "partial_tag_at_end": ("almost a call ", []),  # the opening tag itself was cut
}


@pytest.mark.parametrize("case", HERMES, ids=[c[0] for c in HERMES])
def test_hermes_drop_unclosed_streaming_equals_one_shot(case):
    name, text, content, calls = case
    content, calls = HERMES_DROP_UNCLOSED.get(name, (content, calls))
    assert HermesToolParser.extract(text, drop_unclosed=True) == (content, calls)
    for chunks in splits(text):
        parser = HermesToolParser(drop_unclosed=True)
        events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
        assert assemble(events) == (content, calls), chunks
        check_events(events, calls)


@pytest.mark.parametrize("text,content", [
    ("Checking.\n<", "Checking."),
    ("Checking.\n<tool_call", "Checking."),
    ("Checking.\n<tool_call>", "Checking."),
    ('Checking.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_ca', "Checking."),
    ("x <", "x "),
])
def test_hermes_drop_unclosed_never_leaves_markup(text, content):
    assert HermesToolParser.extract(text, drop_unclosed=True) == (content, [])
    assert HermesToolParser.extract(text) != (content, [])  # the default reads or keeps the block


def test_hermes_holds_back_partial_tag_until_resolved():
    parser = HermesToolParser()
    assert parser.feed("Hi <tool") == [TextDelta("Hi ")]
    assert parser.feed("box> ok\n") == [TextDelta("<toolbox> ok")]  # not a tag after all; "\n" may precede a call
    events = parser.feed('<tool_call>{"name": "f"}</tool_call>')
    assert events == [ToolCallStart(0, "f"), ToolCallArgs(0, "{}")]  # the held "\n" belonged to the call
    assert parser.finish() == []


def test_hermes_call_is_emitted_once_whole():
    parser = HermesToolParser()
    text = call("get_weather", '{"city": "Paris"}')
    seen = []
    for ch in text[:-1]:
        seen += parser.feed(ch)
    assert seen == []  # nothing leaks before the call is known to be valid
    assert parser.feed(text[-1]) == [ToolCallStart(0, "get_weather"), ToolCallArgs(0, '{"city": "Paris"}')]


@pytest.mark.parametrize("case", THINK, ids=[c[0] for c in THINK])
def test_think_splitter_streaming_equals_one_shot(case):
    _, thinking, text, reasoning, content = case
    assert split_reasoning(text, thinking) == (reasoning, content)
    for chunks in splits(text):
        splitter = ThinkStreamSplitter(thinking)
        r, c = [], []
        for chunk in chunks:
            a, b = splitter.feed(chunk)
            r.append(a)
            c.append(b)
        a, b = splitter.finish()
        assert ("".join(r) + a, "".join(c) + b) == (reasoning or "", content), chunks
        assert "</think>" not in "".join(c) + b or "</think>" in content


def test_think_splitter_never_releases_a_partial_close_tag():
    splitter = ThinkStreamSplitter(thinking=True)
    assert splitter.feed("abc\n</th") == ("abc", "")
    assert not splitter.content_started
    assert splitter.feed("ink>\n") == ("", "")
    assert not splitter.content_started  # the second separator newline may still come
    assert splitter.feed("\nHi") == ("", "Hi")
    assert splitter.content_started


PIPELINE = [
    (True, "I will look it up.\n</think>\n\nChecking.\n" + W, "I will look it up.", "Checking.", [tc("get_weather", {"city": "Paris"})]),
    (True, "Call " + T + "? No.\n</think>\n\n" + W + "\n" + T, "Call " + T + "? No.", "",
     [tc("get_weather", {"city": "Paris"}), tc("get_time", {"tz": "UTC"})]),
    (False, "<think>\nuse " + W + "\n</think>\n\nok", "use " + W, "ok", []),
    (False, "Plain answer.", None, "Plain answer.", []),
]


@pytest.mark.parametrize("thinking,text,reasoning,content,calls", PIPELINE)
def test_reasoning_then_tool_calls_pipeline(thinking, text, reasoning, content, calls):
    """Reasoning is split first; only what follows it is searched for calls."""
    r1, rest = split_reasoning(text, thinking)
    assert (r1, *HermesToolParser.extract(rest)) == (reasoning, content, calls)
    for chunks in splits(text):
        splitter, parser = ThinkStreamSplitter(thinking), HermesToolParser()
        r, events = "", []
        for chunk in chunks:
            a, b = splitter.feed(chunk)
            r += a
            events += parser.feed(b)
        a, b = splitter.finish()
        events += parser.feed(b) + parser.finish()
        assert (r + a if splitter.saw_reasoning else None, *assemble(events)) == (reasoning, content, calls)


JSON_SAMPLES = [
    '{}', '[]', '{"a": 1}', '{"a": [1, 2.5, -3e-2, 0, true, false, null]}', '{"s": "x\\"y\\\\z\\u00e9\\n"}',
    '{"a": {"b": {"c": []}}}', ' \n{"a" : 1 }\n', '{"a": 01}', '{"a": 1,}', '{"a" 1}', '{a: 1}', "{'a': 1}",
    '{"a": tru}', '{"a": "\\x"}', '{"a": "\\u12g4"}', '[1 2]', '{"a": 1}}', '{"a": -}', '{"a": 1.}',
    '{"a": 1e}', '{"a": "tab\there"}', '[1, [2, [3, {"x": "]"}]]]', '{"a": 1} x', '{"a": -0.5E+10}',
]


@pytest.mark.parametrize("text", JSON_SAMPLES)
def test_json_scanner_agrees_with_json_module(text):
    scanner = JsonScanner()
    for ch in text:
        scanner.feed(ch)
    try:
        json.loads(text)
        valid = True
    except ValueError:
        valid = False
    assert scanner.complete == valid


def test_json_scanner_tracks_strings():
    scanner = JsonScanner()
    for ch in '{"a": "x </tool':
        scanner.feed(ch)
    assert scanner.in_string and not scanner.complete
    for ch in '_call>"':
        scanner.feed(ch)
    assert not scanner.in_string and not scanner.dead


@pytest.mark.parametrize("text,expected", [
    ('{"name": "f", "arguments": {"b": 1, "a": "é"}}', ToolCall("f", '{"b": 1, "a": "é"}')),
    ('{"name": "f", "arguments": null}', ToolCall("f", "{}")),
    ('{"name": "", "arguments": {}}', None),
    ('{"name": 3}', None),
    ('{"name": "f", "arguments": [1]}', None),
    ('{"name": "f", "arguments": "not json"}', None),
    ('{"name": "f", "arguments": {"x": 1e400}}', None),
])
def test_parse_call_object(text, expected):
    assert parse_call_object(text) == expected


@pytest.mark.parametrize("kwargs,expected", [
    (None, False), ({}, False), ({"enable_thinking": True}, True), ({"enable_thinking": False}, False),
    ({"reasoning_effort": "none"}, False), ({"reasoning_effort": "low"}, True), ({"reasoning_effort": "high"}, True),
    ({"reasoning_effort": "high", "enable_thinking": False}, False), ({"reasoning_effort": "none", "enable_thinking": True}, True),
    ({"enable_thinking": None, "reasoning_effort": "medium"}, True),
])
def test_thinking_enabled(kwargs, expected):
    assert thinking_enabled(kwargs) is expected


REPEATED = ('<tool_call>\n{"name": "area", "arguments": {"base": 10, "height": 5}}\n</tool_call>\n'
            '<tool_call>\n{"name": "area", "arguments": {"height": 5, "base": 10}}\n</tool_call>\n'
            '<tool_call>\n{"name": "area", "arguments": {"base": 3, "height": 5}}\n</tool_call>\n'
            '<tool_call>\n{"name": "area", "arguments": {"base": 10, "height": 5}}\n</tool_call>')


def test_dedupe_drops_repeated_calls_streamed_and_one_shot():
    """A call identical to an earlier one of the same answer (key order aside) is dropped;
    the kept calls are numbered 0, 1, ... without gaps, whichever way the text was cut."""
    content, calls = HermesToolParser.extract(REPEATED)
    assert content == "" and len(calls) == 4  # plain parsing stays faithful
    content, calls = HermesToolParser.extract(REPEATED, dedupe=True)
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("area", {"base": 10, "height": 5}), ("area", {"base": 3, "height": 5})]
    for chunks in splits(REPEATED):
        parser = HermesToolParser(drop_unclosed=True, dedupe=True)
        events = [e for chunk in chunks for e in parser.feed(chunk)] + parser.finish()
        assert assemble(events) == (content, calls), chunks
        check_events(events, calls)
    llama = '{"name": "t", "parameters": {"a": 1}}; {"name": "t", "parameters": {"a": 1}}; {"name": "t", "parameters": {}}'
    assert len(Llama3JsonToolParser.extract(llama)[1]) == 3
    assert [json.loads(c.arguments) for c in Llama3JsonToolParser.extract(llama, dedupe=True)[1]] == [{"a": 1}, {}]
