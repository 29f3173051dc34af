"""``agentloop chat``: a terminal chat on the retry-wrapped chatbot, with feedback commands.

What it owns: the command's flags (``add_chat_command`` registers them on the
``agentloop`` parser; ``main`` runs it standalone, ``python -m agentloop.agents.cli_chat``),
the read–stream–print loop, and the slash commands:

  /good [comment]   thumbs up on the last answer (every completion of the turn)
  /bad [comment]    thumbs down on the last answer
  /fix <text>       a correction: what the last answer should have been
  /retry            resend a failed message, or regenerate the last answer
  /tools on [NAME ...] | off    offer the built-in tools (all, or the named ones)
  /think on|off     thinking mode
  /reset            start a new conversation
  /help, /quit

Invariants: the answer is printed as it streams; every feedback command
prints what the server recorded (or why it did not) before the next prompt;
a failed turn prints the chatbot's message and the session goes on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, TextIO

from agentloop.agents.gateway import DEFAULT_POLICY, DEFAULT_URL, FeedbackError

# The chatbot (openai) and the tools (LangChain) load in run_chat: registering
# the subcommand on the `agentloop` parser must stay cheap for every command.

PROMPT = "you> "
BOT = "bot> "
HELP = """commands:
  /good [comment]      thumbs up on the last answer
  /bad [comment]       thumbs down on the last answer
  /fix <text>          correct the last answer
  /retry               resend a failed message, or regenerate the last answer
  /tools on [NAME...]  offer the built-in tools (or only the named ones); /tools off
  /think on|off        thinking mode
  /reset               start a new conversation
  /help                this help; /quit (or Ctrl-D) leaves"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("AGENTLOOP_URL", DEFAULT_URL),
                   help=f"Gateway URL (default $AGENTLOOP_URL or {DEFAULT_URL}).")
    p.add_argument("--api-key", default=os.environ.get("AGENTLOOP_API_KEY") or os.environ.get("OPENAI_API_KEY")
                   or "agentloop", help="Bearer key (default $AGENTLOOP_API_KEY or $OPENAI_API_KEY).")
    p.add_argument("--model", default="agentloop", help="Model name (default 'agentloop', the live version).")
    p.add_argument("--system", default=DEFAULT_POLICY, help="The policy (system prompt); '' for none.")
    p.add_argument("--max-tokens", type=int, default=512, help="Longest answer, in tokens (default 512).")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (default 0.7).")
    p.add_argument("--tools", action="store_true", help="Start with the built-in tools on.")
    p.add_argument("--think", action="store_true", help="Start with thinking mode on.")
    p.add_argument("--search-root", action="append", default=[], metavar="DIR",
                   help="A folder the file-search tools may read (repeatable).")
    p.add_argument("--attempts", type=int, default=8, help="Calls per answer before giving up (default 8).")
    p.add_argument("--deadline", type=float, default=120.0, help="Seconds of retrying per answer (default 120).")


def add_chat_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``chat`` on the ``agentloop`` parser's subcommands (its ``func(args)`` returns the exit code)."""
    p = subparsers.add_parser("chat", help="Chat with the model in the terminal (streaming; /good /bad /fix).",
                              description=__doc__.splitlines()[0])
    _add_arguments(p)
    p.set_defaults(func=run_chat)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentloop chat", description=__doc__.splitlines()[0])
    _add_arguments(p)
    return p


class _Screen:
    """Prints a streamed turn: reasoning, then the answer, with notes for retries and tools."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.mode: str | None = None  # what the current line holds: None, "reasoning", "content"

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def line(self, text: str) -> None:
        self.end()
        self.write(text + "\n")

    def end(self) -> None:
        if self.mode is not None:
            self.write("\n")
            self.mode = None

    def delta(self, kind: str, text: str) -> None:
        if kind != self.mode:
            self.end()
            self.write("(thinking) " if kind == "reasoning" else BOT)
            self.mode = kind
        self.write(text)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "retry":
            self.line(f"[retry] {info['error']}; attempt {info['attempt'] + 1} in {info['wait']:.1f} s")
        elif kind == "tool":
            status = "" if info["ok"] else " (error)"
            content = info["content"] if len(info["content"]) <= 200 else info["content"][:200] + "..."
            self.line(f"[tool] {info['name']}({info['arguments']}) -> {content}{status}")


def _feedback_note(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    if first["type"] == "thumbs":
        what = "thumbs up" if first["value"] == 1 else "thumbs down"
    else:
        what = first["type"]
    targets = ", ".join(r["completion_id"] for r in rows)
    return f"[feedback] {what} recorded on {targets} ({', '.join(r['id'] for r in rows)})"


def _switch(arg: str, name: str) -> bool:
    word = arg.split()[0].lower() if arg.split() else ""
    if word not in ("on", "off"):
        raise ValueError(f"usage: /{name} on|off")
    return word == "on"


def _command(bot: Any, screen: _Screen, line: str, args: argparse.Namespace) -> bool:
    """Run one slash command; False means quit."""
    from agentloop.agents.chatbot import ChatbotError

    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    name = name.lower()
    try:
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            screen.line(HELP)
        elif name in ("good", "bad"):
            rows = bot.good(rest or None) if name == "good" else bot.bad(rest or None)
            screen.line(_feedback_note(rows))
        elif name == "fix":
            if not rest:
                raise ValueError("usage: /fix <the answer it should have given>")
            screen.line(_feedback_note(bot.fix(rest)))
        elif name == "retry":
            _turn(bot, screen, None)
        elif name == "tools":
            on = _switch(rest, "tools")
            names = rest.split()[1:]
            if on:
                from agentloop.tools.builtin import builtin_registry

                reg = builtin_registry(args.search_root or None)
                bot.tools = reg.subset(names) if names else reg
            bot.use_tools = on
            screen.line(f"[tools] {'on: ' + ', '.join(bot.tools.names()) if on else 'off'}")
        elif name == "think":
            bot.thinking = _switch(rest, "think")
            screen.line(f"[think] {'on' if bot.thinking else 'off'}")
        elif name == "reset":
            bot.reset()
            screen.line("[reset] new conversation")
        else:
            screen.line(f"unknown command /{name}; /help lists them")
    except FeedbackError as e:
        screen.line(f"[feedback] not recorded: {e}")
    except (ChatbotError, ValueError, KeyError) as e:
        screen.line(f"[error] {e}")
    return True


def _turn(bot: Any, screen: _Screen, text: str | None) -> None:
    from agentloop.agents.chatbot import ChatbotError

    try:
        if text is None:
            bot.retry(on_delta=screen.delta, on_event=screen.event)
        else:
            bot.ask(text, on_delta=screen.delta, on_event=screen.event)
        screen.end()
    except ChatbotError as e:
        screen.line(f"[error] {e}")
    except KeyboardInterrupt:
        screen.line("[interrupted] the answer was dropped; /retry asks again")


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from agentloop.agents.chatbot import Chatbot

    out = stdout or sys.stdout
    # The HTTP clients log every request at INFO; on a chat screen that is noise.
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    tools = None
    if args.tools:
        from agentloop.tools.builtin import builtin_registry

        tools = builtin_registry(args.search_root or None)
    bot = Chatbot(args.url, args.api_key, args.model, policy=args.system or None, temperature=args.temperature,
                  max_tokens=args.max_tokens, attempts=args.attempts, deadline=args.deadline, tools=tools,
                  use_tools=bool(args.tools), thinking=args.think)
    screen = _Screen(out)
    screen.line(f"agentloop chat: {args.url} (model {args.model}). /help for commands, Ctrl-D to quit.")
    interactive = stdin is None and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 — line editing and history for input()
        except ImportError:
            pass
    try:
        while True:
            try:
                if stdin is None:
                    line = input(PROMPT)
                else:
                    screen.write(PROMPT)
                    line = stdin.readline()
                    if not line:
                        raise EOFError
            except EOFError:
                screen.write("\n")
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not _command(bot, screen, line, args):
                    return 0
            else:
                _turn(bot, screen, line)
    except KeyboardInterrupt:
        screen.write("\n")
        return 130
    finally:
        bot.close()


def main(argv: list[str] | None = None) -> int:
    return run_chat(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
