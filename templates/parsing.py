"""Pure-python parsers for what a model writes in the agentloop chat formats.

Owns: turning generated text -- whole, or as a stream of deltas -- into
content and tool calls (and, through `reasoning.py`, whose names it re-exports,
reasoning), for the two template families of this
package: `chatml_tools.jinja` (Hermes-style `<tool_call>` blocks, optional
`<think>` reasoning) and `llama3_json.jinja` (bare `{"name", "parameters"}`
objects separated by `; `). No vllm/torch imports: the gateway, the trainer
and the vLLM plugin all use these same state machines.

Invariant: each parser is a deterministic machine over characters, so the way
a text is cut into deltas changes only *when* output comes out, never *what*:
feeding any chunking of a text and then `finish()` yields exactly what the
one-shot `extract` / `split_reasoning` yields for that text.
- Streamed content never holds a piece of a valid call's markup: a possibly
  partial tag at the end of the buffer is held back until resolved.
- A call is emitted only once it is complete and valid, as a `ToolCallStart`
  followed by one `ToolCallArgs` whose text is its final arguments JSON,
  normalised as `json.dumps(obj, ensure_ascii=False)` (`{}` included).
  Emitting nothing earlier is what lets a broken call still turn into content.
- Anything that does not parse as a call (bad JSON, a non-object, no name, cut
  off by the end) comes back verbatim as content; nothing here raises on
  model output. One opt-in exception: `HermesToolParser(drop_unclosed=True)`
  drops a `<tool_call>` block (or the start of its tag) the output leaves
  open: for a decoder whose grammar cannot leave one open except by being cut
  off, that is a half call -- neither content nor a call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

from agentloop.templates.reasoning import (
    ThinkStreamSplitter, partial_suffix as _partial_suffix, split_reasoning, thinking_enabled,
)

__all__ = [
    "ToolCall", "TextDelta", "ToolCallStart", "ToolCallArgs", "Event",
    "JsonScanner", "parse_call_object", "assemble", "thinking_enabled",
    "ToolCallStreamParser", "HermesToolParser", "Llama3JsonToolParser",
    "ThinkStreamSplitter", "split_reasoning", "extract_hermes",
    "extract_llama3_json", "TOOL_PARSERS",
]

@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # normalised JSON object text

@dataclass(frozen=True)
class TextDelta:
    text: str

@dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str

@dataclass(frozen=True)
class ToolCallArgs:
    index: int
    text: str

Event = Union[TextDelta, ToolCallStart, ToolCallArgs]

def _push_text(out: list[Event], text: str) -> None:
    if not text:
        return
    if out and isinstance(out[-1], TextDelta):
        out[-1] = TextDelta(out[-1].text + text)
    else:
        out.append(TextDelta(text))

# ---------------------------------------------------------------- JSON scan

_WS = " \t\n\r"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
# What the scanner expects next, outside strings, literals and numbers.
_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _COMMA_OR_CLOSE, _END = range(7)
# Number sub-states; a number may end only in a terminal one.
_N_SIGN, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(8)
_N_TERMINAL = frozenset((_N_ZERO, _N_INT, _N_FRAC, _N_EXP))

class JsonScanner:
    """Incremental syntax check of one JSON value, one character at a time.

    It answers the questions a streaming parser needs before the value is
    whole: is this character inside a string (so a tag-looking run there is
    data, not markup), has the value become impossible (`dead`), and has a
    top-level container just closed (`complete`). Strict RFC 8259 grammar.
    """

    __slots__ = ("_stack", "_expect", "_in_str", "_is_key", "_esc", "_lit", "_num", "dead")

    def __init__(self) -> None:
        self._stack: list[str] = []
        self._expect = _VALUE
        self._in_str = False
        self._is_key = False
        self._esc = 0  # -1: after a backslash; n > 0: hex digits of \\u still due
        self._lit = ""  # rest of true/false/null still due
        self._num = -1  # number sub-state, -1 when not in a number
        self.dead = False

    @property
    def in_string(self) -> bool:
        return self._in_str and not self.dead

    @property
    def complete(self) -> bool:
        return not self.dead and self._expect == _END

    def feed(self, c: str) -> None:
        if self.dead:
            return
        if self._in_str:
            self._string_char(c)
            return
        if self._lit:
            if c == self._lit[0]:
                self._lit = self._lit[1:]
                if not self._lit:
                    self._value_done()
            else:
                self.dead = True
            return
        if self._num >= 0:
            if self._number_char(c):
                return
            if self._num not in _N_TERMINAL:
                self.dead = True
                return
            self._num = -1
            self._value_done()  # and `c` is the first character after it
        if c in _WS:
            return
        expect = self._expect
        if expect == _VALUE_OR_CLOSE and c == "]":
            self._close()
        elif expect in (_VALUE, _VALUE_OR_CLOSE):
            self._start_value(c)
        elif expect == _KEY_OR_CLOSE and c == "}":
            self._close()
        elif expect in (_KEY, _KEY_OR_CLOSE) and c == '"':
            self._in_str, self._is_key = True, True
        elif expect == _COLON and c == ":":
            self._expect = _VALUE
        elif expect == _COMMA_OR_CLOSE and c == ",":
            self._expect = _KEY if self._stack[-1] == "{" else _VALUE
        elif expect == _COMMA_OR_CLOSE and c == ("}" if self._stack[-1] == "{" else "]"):
            self._close()
        else:
            self.dead = True

    def _start_value(self, c: str) -> None:
        if c == "{":
            self._stack.append(c)
            self._expect = _KEY_OR_CLOSE
        elif c == "[":
            self._stack.append(c)
            self._expect = _VALUE_OR_CLOSE
        elif c == '"':
            self._in_str, self._is_key = True, False
        elif c in "tfn":
            self._lit = {"t": "rue", "f": "alse", "n": "ull"}[c]
        elif c == "-":
            self._num = _N_SIGN
        elif c in _DIGITS:
            self._num = _N_ZERO if c == "0" else _N_INT
        else:
            self.dead = True

    def _string_char(self, c: str) -> None:
        if self._esc == -1:
            if c in '"\\/bfnrt':
                self._esc = 0
            elif c == "u":
                self._esc = 4
            else:
                self.dead = True
        elif self._esc > 0:
            if c in _HEX:
                self._esc -= 1
            else:
                self.dead = True
        elif c == "\\":
            self._esc = -1
        elif c == '"':
            self._in_str = False
            if self._is_key:
                self._expect = _COLON
            else:
                self._value_done()
        elif c < " ":
            self.dead = True  # raw control characters are invalid in JSON strings

    def _number_char(self, c: str) -> bool:
        s = self._num
        if c in _DIGITS:
            if s == _N_ZERO:
                return False  # "01": the number ended at "0", "1" is then an error
            if s == _N_SIGN:
                self._num = _N_ZERO if c == "0" else _N_INT
            elif s == _N_DOT:
                self._num = _N_FRAC
            elif s in (_N_E, _N_ESIGN):
                self._num = _N_EXP
            return True
        if c == "." and s in (_N_ZERO, _N_INT):
            self._num = _N_DOT
        elif c in "eE" and s in (_N_ZERO, _N_INT, _N_FRAC):
            self._num = _N_E
        elif c in "+-" and s == _N_E:
            self._num = _N_ESIGN
        else:
            return False
        return True

    def _close(self) -> None:
        self._stack.pop()
        self._value_done()

    def _value_done(self) -> None:
        self._expect = _COMMA_OR_CLOSE if self._stack else _END

def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")

def parse_call_object(text: str, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A tool call from one JSON object text, or None if it is not one.

    Needs a non-empty string "name"; the arguments (first of `arg_keys`
    present, missing or null meaning `{}`) must be an object or a JSON string
    holding one. NaN/Infinity are rejected: clients could not parse them back.
    """
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args: Any = None
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):
        try:
            args = json.loads(args, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    try:
        return ToolCall(name, json.dumps(args, ensure_ascii=False, allow_nan=False))
    except ValueError:  # e.g. 1e400 decoded to inf
        return None

def assemble(events: Iterable[Event]) -> tuple[str, list[ToolCall]]:
    """Fold a stream of events into (content, calls), as a client would."""
    content: list[str] = []
    names: dict[int, str] = {}
    args: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, TextDelta):
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            names[event.index] = event.name
            args.setdefault(event.index, [])
        else:
            args.setdefault(event.index, []).append(event.text)
    return "".join(content), [ToolCall(names[i], "".join(args[i])) for i in sorted(names)]

# ----------------------------------------------------------- tool streams

class ToolCallStreamParser:
    """Base of the streaming tool-call parsers: `feed` deltas, then `finish`."""

    name = ""

    def __init__(self, dedupe: bool = False) -> None:
        self._index = 0
        # `dedupe`: a call identical to one already emitted in this output (same
        # name, same arguments up to key order) is dropped. Small models, once
        # a grammar lets them follow a call with another, tend to repeat the
        # first verbatim; a client would run it twice. Off for plain parsing
        # (round trips of rendered turns must stay exact); the serving plugin
        # turns it on (AGENTLOOP_DEDUPE_TOOL_CALLS).
        self.dedupe = dedupe
        self._seen: set[tuple[str, str]] = set()

    def feed(self, delta: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        raise NotImplementedError

    @classmethod
    def extract(cls, text: str, **options: Any) -> tuple[str, list[ToolCall]]:
        """One-shot parse of a complete output: (content, calls); `options` go to the constructor."""
        parser = cls(**options)
        return assemble(parser.feed(text) + parser.finish())

    def _emit_call(self, call: ToolCall, out: list[Event]) -> None:
        if self.dedupe:
            key = (call.name, json.dumps(json.loads(call.arguments), sort_keys=True))
            if key in self._seen:
                return
            self._seen.add(key)
        out.append(ToolCallStart(self._index, call.name))
        out.append(ToolCallArgs(self._index, call.arguments))
        self._index += 1

class HermesToolParser(ToolCallStreamParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks.

    Content is the text outside valid calls, with the template's own joints
    removed so a rendered turn parses back exactly: a valid call owns one
    newline right before it, and a whitespace-only run after a valid call
    (before the next call or the end) is dropped. A `</tool_call>` inside a
    JSON string of the body is data, not the end of the call.

    `drop_unclosed`: a block still open when the output ends -- or the start
    of its opening tag (a trailing `<`, `<tool`, ...) -- is dropped with the
    joint before it, instead of being read as a call (when its body is a whole
    call object) or returned verbatim. A call then counts only once its
    `</tool_call>` is written, so a cut-off output never yields a half call or
    call markup as content, however it was cut. The price: an answer that
    really ends in such a prefix (`... x <`) loses it.
    """

    name = "agentloop_hermes"
    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def __init__(self, drop_unclosed: bool = False, dedupe: bool = False) -> None:
        super().__init__(dedupe)
        self.drop_unclosed = drop_unclosed
        self._text = ""  # unemitted text outside calls
        self._after_call = False  # a valid call closed and only whitespace followed
        self._in_call = False
        self._held = ""  # text before the open call, kept or dropped by its validity
        self._body: list[str] = []
        self._scan = JsonScanner()
        self._match = 0  # characters of CLOSE matched so far

    def feed(self, delta: str) -> list[Event]:
        out: list[Event] = []
        rest = delta
        while rest:
            if self._in_call:
                rest = self._feed_call(rest, out)
                continue
            self._text += rest
            rest = ""
            at = self._text.find(self.OPEN)
            if at < 0:
                self._emit_safe_text(out)
            else:
                rest = self._text[at + len(self.OPEN):]
                self._open_call(self._text[:at], out)
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._in_call:
            # Cut off before `</tool_call>`: still a call if the body (minus a
            # partial closing tag) is a whole call object, else verbatim text
            # -- unless unclosed blocks are dropped.
            body = "".join(self._body)
            call = None if self.drop_unclosed else parse_call_object(body)
            if call is not None:
                self._emit_call(call, out)
            elif not self.drop_unclosed:
                _push_text(out, self._held + self.OPEN + body + self.CLOSE[: self._match])
            self._in_call, self._held, self._match = False, "", 0
        elif self._text:
            text = self._text
            partial = _partial_suffix(text, self.OPEN)
            if self.drop_unclosed and partial:
                # The opening tag itself was cut off: drop it and its joint.
                text = text[:-partial]
                text = text[:-1] if text.endswith("\n") else text
            if not (self._after_call and not text.strip()):
                _push_text(out, text)
            self._text = ""
        return out

    def _emit_safe_text(self, out: list[Event]) -> None:
        text = self._text
        safe = len(text) - _partial_suffix(text, self.OPEN)
        if safe and text[safe - 1] == "\n":
            safe -= 1  # a call may still follow and own this newline
        if self._after_call and not text[:safe].strip():
            return
        if safe:
            _push_text(out, text[:safe])
            self._text = text[safe:]
            self._after_call = False

    def _open_call(self, before: str, out: list[Event]) -> None:
        cut = len(before) - 1 if before.endswith("\n") else len(before)
        if self._after_call and not before[:cut].strip():
            self._held = before
        else:
            if cut:
                _push_text(out, before[:cut])
                self._after_call = False
            self._held = before[cut:]
        self._text = ""
        self._in_call = True
        self._body = []
        self._scan = JsonScanner()
        self._match = 0

    def _feed_call(self, s: str, out: list[Event]) -> str:
        close = self.CLOSE
        for pos, c in enumerate(s):
            if self._match:
                if c == close[self._match]:
                    self._match += 1
                    if self._match == len(close):
                        self._close_call(out)
                        return s[pos + 1:]
                    continue
                pending, self._match = close[: self._match], 0
                for p in pending:  # not the closing tag after all: body text
                    self._body.append(p)
                    self._scan.feed(p)
            if c == "<" and not self._scan.in_string:
                self._match = 1
                continue
            self._body.append(c)
            self._scan.feed(c)
        return ""

    def _close_call(self, out: list[Event]) -> None:
        body = "".join(self._body)
        call = parse_call_object(body)
        if call is not None:
            self._emit_call(call, out)
            self._after_call = True
        else:
            _push_text(out, self._held + self.OPEN + body + self.CLOSE)
            self._after_call = False
        self._in_call, self._held, self._match, self._body = False, "", 0, []

class Llama3JsonToolParser(ToolCallStreamParser):
    """Llama-3.x JSON tool calls: `{"name": ..., "parameters": {...}}; {...}`.

    Only an output that starts (after whitespace and an optional
    `<|python_tag|>`) with `{` is read as calls. Calls are separated by `;`
    and/or whitespace. The first object that is not a valid call, and
    everything after it, is content -- for the very first object that means the
    whole output verbatim. Text after the last call (its leading whitespace
    dropped) is content too.
    """

    name = "agentloop_llama3_json"
    TAG = "<|python_tag|>"
    _START, _OBJECT, _BETWEEN, _TEXT = range(4)

    def __init__(self, dedupe: bool = False) -> None:
        super().__init__(dedupe)
        self._state = self._START
        self._lead = ""  # undecided start of the output
        self._prefix = ""  # text given back as content if the current object fails
        self._raw: list[str] = []
        self._scan = JsonScanner()
        self._semicolon = False

    def feed(self, delta: str) -> list[Event]:
        out: list[Event] = []
        for pos, c in enumerate(delta):
            if self._state == self._TEXT:
                _push_text(out, delta[pos:])
                break
            self._step(c, out)
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._state == self._START:
            _push_text(out, self._lead)
        elif self._state == self._OBJECT:
            _push_text(out, self._prefix + "".join(self._raw))
        self._state = self._TEXT
        self._lead = self._prefix = ""
        self._raw = []
        return out

    def _step(self, c: str, out: list[Event]) -> None:
        if self._state == self._START:
            self._lead += c
            head = self._lead.lstrip(_WS)
            if head.startswith(self.TAG):
                head = head[len(self.TAG):].lstrip(_WS)
            elif self.TAG.startswith(head):
                return  # still possibly the tag (or only whitespace so far)
            if not head:
                return
            if head == "{":
                self._begin_object(self._lead[:-1], c)
            else:
                _push_text(out, self._lead)
                self._state = self._TEXT
        elif self._state == self._OBJECT:
            self._raw.append(c)
            self._scan.feed(c)
            if self._scan.dead:
                self._fail(out)
            elif self._scan.complete:
                call = parse_call_object("".join(self._raw), ("parameters", "arguments"))
                if call is None:
                    self._fail(out)
                else:
                    self._emit_call(call, out)
                    self._state, self._semicolon, self._raw = self._BETWEEN, False, []
        elif c in _WS:
            pass
        elif c == ";" and not self._semicolon:
            self._semicolon = True
        elif c == "{":
            self._begin_object("", c)
        else:
            _push_text(out, c)
            self._state = self._TEXT

    def _begin_object(self, prefix: str, c: str) -> None:
        self._state = self._OBJECT
        self._prefix = prefix
        self._raw = [c]
        self._scan = JsonScanner()
        self._scan.feed(c)

    def _fail(self, out: list[Event]) -> None:
        _push_text(out, self._prefix + "".join(self._raw))
        self._state, self._prefix, self._raw = self._TEXT, "", []

# One-shot parsers: text -> (content, calls).
extract_hermes = HermesToolParser.extract
extract_llama3_json = Llama3JsonToolParser.extract

TOOL_PARSERS: dict[str, type[ToolCallStreamParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}
