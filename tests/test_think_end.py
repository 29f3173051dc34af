"""The engine's CloseThinking logits processor (serve/inside_vllm/think_end.py), step by step.

Owns the processor's decisions on hand-made logits: inside thinking a stop token
never wins (where it is the model's choice, the end string is written instead,
token by token); after the close, stops wait for the answer's first word; vLLM's
budget forcing is yielded to; requests that do not think are left alone. The
same processor on the real engine is tests/test_thinking.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.engine  # imports vllm

from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality  # noqa: E402

from agentloop.serve.inside_vllm.think_end import CloseThinking  # noqa: E402

EOS, NL, CLOSE, NLNL, START, WORD, OTHER = 0, 1, 11, 2, 10, 7, 3
TEXT = {NL: "\n", NLNL: "\n\n", CLOSE: "</think>", WORD: "Hi", OTHER: "hmm", EOS: ""}
VOCAB = 16


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(TEXT.get(i, "x") for i in ids)


def processor() -> CloseThinking:
    rc = SimpleNamespace(reasoning_start_token_ids=[START], reasoning_end_token_ids=[NL, CLOSE],
                         natural_reasoning_end_token_ids=[CLOSE])
    p = CloseThinking(SimpleNamespace(reasoning_config=rc, model_config=None), torch.device("cpu"), False)
    p._tokenizer = Tok()
    return p


def params():
    return SimpleNamespace(ignore_eos=False, all_stop_token_ids={EOS}, eos_token_id=EOS)


def add(p, index, prompt, out, prm=None):
    p.update_state(BatchUpdate(batch_size=index + 1, removed=[], added=[(index, prm or params(), prompt, out)],
                               moved=[]))


def step(p, out, top: int, rows: int = 1, index: int = 0) -> int:
    """One decode step where the model's favourite is `top` (EOS second); returns the greedy token."""
    logits = torch.zeros(rows, VOCAB)
    logits[index, OTHER] = 1.0
    logits[index, top] = 5.0
    chosen = int(p.apply(logits)[index].argmax())
    out.append(chosen)
    return chosen


def test_a_stop_inside_thinking_writes_the_end_and_the_answer_follows():
    p, out = processor(), []
    add(p, 0, [5, START, NL], out)
    assert step(p, out, OTHER) == OTHER                       # thinking goes on as the model likes
    assert [step(p, out, EOS) for _ in range(2)] == [NL, CLOSE]  # it tries to end: the end marker
    assert step(p, out, NLNL) == NLNL                         # past the marker the model writes again
    assert step(p, out, EOS) == OTHER                         # no answer yet: no stop
    assert step(p, out, EOS) == EOS and not p.requests        # now the turn may end; tracking is over


def test_sampling_cannot_pick_a_stop_inside_thinking():
    p, out = processor(), []
    add(p, 0, [START], out)
    logits = torch.zeros(1, VOCAB)
    logits[0, OTHER], logits[0, EOS] = 3.0, 2.0
    got = p.apply(logits)[0]
    assert got[EOS] == float("-inf") and got[OTHER] == 3.0  # the rest untouched


def test_a_natural_close_and_the_budgets_forcing_are_followed():
    p, out = processor(), []
    add(p, 0, [START], out)
    assert [step(p, out, t) for t in (OTHER, NL, CLOSE, NLNL)] == [OTHER, NL, CLOSE, NLNL]  # the model closes
    assert step(p, out, EOS) == OTHER and step(p, out, WORD) == WORD and step(p, out, EOS) == EOS
    # vLLM's budget began the marker (its 1e9 logit wins): the processor starts too, sees the
    # budget's token where it expected its own, and yields; the close is found by its scan.
    p, out = processor(), [OTHER, NL]
    add(p, 0, [START], out)
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 5.0
    assert int(p.apply(logits)[0].argmax()) == NL and p.requests[0].forcing_from == 2
    out.append(CLOSE)  # what the budget forced instead
    assert step(p, out, WORD) == WORD and p.requests[0].forcing_from is None and p.requests[0].closed_at == 3


def test_requests_that_do_not_think_are_left_alone():
    p = processor()
    add(p, 0, [5, 6], [])                                      # thinking off
    add(p, 1, [START, 4, CLOSE, 5], [])                        # an earlier turn's block, closed
    add(p, 2, [START], [], SimpleNamespace(ignore_eos=True, all_stop_token_ids={EOS}, eos_token_id=EOS))
    assert p.requests == {}
    out = []
    assert step(p, out, EOS) == EOS


def test_batch_moves_and_removals_follow_the_request():
    p, out = processor(), []
    add(p, 2, [START], out)
    p.update_state(BatchUpdate(batch_size=3, removed=[], added=[], moved=[(2, 0, MoveDirectionality.SWAP)]))
    assert list(p.requests) == [0]
    assert step(p, out, EOS, rows=3, index=0) == NL
    p.update_state(BatchUpdate(batch_size=0, removed=[0], added=[], moved=[]))
    assert p.requests == {}
