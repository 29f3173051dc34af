"""``agentloop chat`` driven like a person would: through a pseudo-terminal (pexpect).

The session gateway's tiny model answers its scripts exactly, so the screen
can be matched word for word; feedback commands are checked in the gateway's
own store (``server.db()``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import pexpect
import pytest

from agentloop.agents.cli_chat import add_chat_command, build_parser, run_chat
from tests.conftest import ROOT, free_port

GREETING = "Hello! How can I help you today?"


def spawn(server, *extra: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "agentloop.agents.cli_chat", "--url", server.url, "--api-key", "test-key",
                                           "--temperature", "0", "--max-tokens", "48", *extra],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    child.expect_exact("you> ")
    return child


def feedback_rows(server, completion_id: str) -> list[tuple]:
    with server.db() as con:
        return con.execute("SELECT type, value, correction, comment FROM feedback WHERE completion_id = ? "
                           "ORDER BY created_at, rowid", (completion_id,)).fetchall()


def test_chat_streams_and_records_feedback(server):
    child = spawn(server)
    try:
        child.sendline("Hello")
        child.expect_exact("bot> " + GREETING)
        child.expect_exact("you> ")
        child.sendline("/bad")
        child.expect(r"\[feedback\] thumbs down recorded on (chatcmpl-[0-9a-f]+) \((fb-[0-9a-f]+)\)")
        cid, fid = child.match.group(1), child.match.group(2)
        child.expect_exact("you> ")
        # The row is in the gateway's store, on the completion the screen showed.
        assert feedback_rows(server, cid) == [("thumbs", -1, None, None)]
        with server.db() as con:
            assert con.execute("SELECT id FROM feedback WHERE id = ?", (fid,)).fetchone() == (fid,)
        assert json.loads(server.wait_row(cid)["response"])["choices"][0]["message"]["content"] == GREETING

        child.sendline("/fix Hi there! What can I do for you?")
        child.expect(r"\[feedback\] correction recorded on " + cid)
        child.expect_exact("you> ")
        kind, value, correction, _ = feedback_rows(server, cid)[-1]
        assert (kind, value, json.loads(correction)) == \
            ("correction", None, {"role": "assistant", "content": "Hi there! What can I do for you?"})

        child.sendline("/good nice")
        child.expect_exact(f"[feedback] thumbs up recorded on {cid}")
        child.expect_exact("you> ")
        assert feedback_rows(server, cid)[-1] == ("thumbs", 1, None, "nice")

        child.sendline("/fix")
        child.expect_exact("[error] usage: /fix <the answer it should have given>")
        child.expect_exact("you> ")
        child.sendline("/nonsense")
        child.expect_exact("unknown command /nonsense")
        child.expect_exact("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_tools_thinking_and_retry(server):
    child = spawn(server)
    try:
        child.sendline("/tools on calculator")
        child.expect_exact("[tools] on: calculator")
        child.expect_exact("you> ")
        child.sendline("What is 12 times 7?")
        child.expect_exact('[tool] calculator({"expression": "12*7"}) -> 84')
        child.expect_exact("bot> 12 times 7 is 84.")
        child.expect_exact("you> ")
        child.sendline("/bad")  # a tool turn: both completions share the verdict
        child.expect(r"thumbs down recorded on (chatcmpl-[0-9a-f]+), (chatcmpl-[0-9a-f]+) ")
        ids = child.match.groups()
        assert all(feedback_rows(server, i) == [("thumbs", -1, None, None)] for i in ids)
        child.expect_exact("you> ")

        child.sendline("/reset")
        child.expect_exact("you> ")
        child.sendline("/tools off")
        child.expect_exact("[tools] off")
        child.sendline("/think on")
        child.expect_exact("[think] on")
        child.expect_exact("you> ")
        child.sendline("What is 2+2?")
        child.expect_exact("(thinking) The user wants the sum of 2 and 2. That is 4.")
        child.expect_exact("bot> 2 + 2 = 4.")
        child.expect_exact("you> ")
        child.sendline("/retry")  # regenerates the last answer (a new completion)
        child.expect_exact("bot> 2 + 2 = 4.")
        child.expect_exact("you> ")
        child.sendline("/think maybe")
        child.expect_exact("[error] usage: /think on|off")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_against_a_dead_server_says_so_and_goes_on(tmp_path):
    """No pty needed: the loop takes any text streams."""
    args = build_parser().parse_args(["--url", f"http://127.0.0.1:{free_port()}", "--attempts", "2",
                                      "--deadline", "5"])
    out = io.StringIO()
    code = run_chat(args, stdin=io.StringIO("Hello\n/good\n/retry\n"), stdout=out)
    text = out.getvalue()
    assert code == 0
    # "Hello" and "/retry" each made 2 attempts: one retry notice each, then the message.
    assert text.count("[retry] connection failed") == 2
    assert "[error] Sorry, the model server did not answer (connection failed" in text
    assert "[error] There is no answer to give feedback on yet." in text


def test_chat_subcommand_registers_on_the_agentloop_parser():
    p = argparse.ArgumentParser(prog="agentloop")
    sub = p.add_subparsers(dest="command", required=True)
    add_chat_command(sub)
    args = p.parse_args(["chat", "--url", "http://gw:8000", "--api-key", "k", "--model", "agentloop@v0001"])
    assert args.func is run_chat and (args.url, args.api_key, args.model) == ("http://gw:8000", "k",
                                                                            "agentloop@v0001")
    with pytest.raises(SystemExit):
        p.parse_args(["chat", "--bogus"])
