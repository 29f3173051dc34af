"""A vLLM logits processor: a thinking request ends its thinking, then answers.

Owns `CloseThinking`, loaded into the engine by `--logits-processors`
(serve/engine/supervisor.py). Only ever imported inside a vLLM process.

Small models often end the turn (EOS, `<|im_end|>`) inside their `<think>`
block, with the answer written into the thinking: the client then gets no
content at all. vLLM's `thinking_token_budget` closes thinking that runs too
long; nothing in vLLM closes thinking that stops too early. This does, for the
requests whose prompt leaves a thinking block open (thinking on):
- while thinking, a stop token never ends the turn: where one is the most
  likely next token (the model is trying to end), the engine writes the
  template's end-of-thinking marker instead (vLLM's reasoning_end_str,
  "\\n</think>"), token by token, and the model goes on to the answer;
  where it is not, stop tokens are masked so sampling cannot pick one;
- right after thinking closes (by the model, the budget or this), stop tokens
  stay masked until the answer has a non-whitespace token, so a thinking turn
  never ends with empty content.

Invariants: the decision uses the logits as they reach the processor (greedy
picks exactly what the model would have), only token positions counted from
the live output list (a step whose sample is discarded, as in a chunked
prefill, repeats the same decision), and it yields to anything else that
writes the end string (vLLM's budget forcing wins with its 1e9 logit; the
scan for the close marker then ends this request's tracking), and it writes
nothing past the marker: from there a request's grammar (a forced tool call,
a json_schema) decides, and a forced token it forbids would end the request
with an error. Requests with `ignore_eos`, or no thinking block open, are left
alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor.interface import BatchUpdate, LogitsProcessor, MoveDirectionality

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(__name__)


def _find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    """Index of the first occurrence of `needle` in `haystack` at or after `start`, else -1."""
    n = len(needle)
    for i in range(max(start, 0), len(haystack) - n + 1):
        if haystack[i:i + n] == needle:
            return i
    return -1


def _rfind(haystack: list[int], needle: list[int]) -> int:
    n = len(needle)
    for i in range(len(haystack) - n, -1, -1):
        if haystack[i:i + n] == needle:
            return i
    return -1


@dataclass
class _Request:
    out: list[int]                    # the request's live output ids (vLLM appends to it)
    stops: list[int]                  # ids that would end the turn
    scanned: int = 0                  # output positions already searched for the close marker
    closed_at: int | None = None      # output length when thinking closed
    forcing_from: int | None = None   # output length when this processor began writing the end string
    stops_tensor: torch.Tensor | None = field(default=None, repr=False)


class CloseThinking(LogitsProcessor):
    """No turn ends inside thinking or before the answer's first word (module doc)."""

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.requests: dict[int, _Request] = {}
        rc = getattr(vllm_config, "reasoning_config", None)
        self.start_ids: list[int] = list(getattr(rc, "reasoning_start_token_ids", None) or [])
        self.end_ids: list[int] = list(getattr(rc, "reasoning_end_token_ids", None) or [])
        self.close_ids: list[int] = list(getattr(rc, "natural_reasoning_end_token_ids", None) or self.end_ids)
        self.enabled = bool(self.start_ids and self.end_ids and self.close_ids)
        self._tokenizer = None
        self._model_config = vllm_config.model_config
        if not self.enabled:
            logger.info("CloseThinking: no reasoning config with start and end strings; inactive.")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is greedy

    # ------------------------------------------------------------ batch bookkeeping

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self.enabled or batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt_ids, out in batch_update.added:
            self.requests.pop(index, None)
            tracked = self._track(params, prompt_ids, out)
            if tracked is not None:
                self.requests[index] = tracked
        for a, b, direction in batch_update.moved:
            ra, rb = self.requests.pop(a, None), self.requests.pop(b, None)
            if ra is not None:
                self.requests[b] = ra
            if rb is not None and direction == MoveDirectionality.SWAP:
                self.requests[a] = rb

    def _track(self, params, prompt_ids: list[int] | None, out: list[int]) -> _Request | None:
        if params is None or getattr(params, "ignore_eos", False) or not prompt_ids:
            return None
        if _rfind(prompt_ids, self.start_ids) <= _rfind(prompt_ids, self.close_ids):
            return None  # the prompt leaves no thinking block open
        stops = set(getattr(params, "all_stop_token_ids", None) or ())
        eos = getattr(params, "eos_token_id", None)
        if eos is not None:
            stops.add(eos)
        if not stops:
            return None
        return _Request(out=out, stops=sorted(stops))

    # ------------------------------------------------------------ per step

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        done = []
        for index, r in self.requests.items():
            if index >= logits.shape[0]:
                continue
            if self._step(r, logits[index]):
                done.append(index)
        for index in done:
            del self.requests[index]
        return logits

    def _step(self, r: _Request, row: torch.Tensor) -> bool:
        """Adjust one request's logits; True when it needs no more tracking."""
        n = len(r.out)
        if r.forcing_from is not None:  # writing the end string: finish it first
            k = n - r.forcing_from
            if k > 0 and r.out[n - 1] != self.end_ids[k - 1]:
                r.forcing_from = None  # something else wrote there (vLLM's budget): yield to it
            elif k < len(self.end_ids):
                self._force(row, self.end_ids[k])
                return False
            else:
                r.closed_at, r.forcing_from, r.scanned = n, None, n
        if r.closed_at is None:
            hit = _find(r.out, self.close_ids, r.scanned - len(self.close_ids) + 1)
            r.scanned = n
            if hit >= 0:
                r.closed_at = hit + len(self.close_ids)
        if r.stops_tensor is None:
            r.stops_tensor = torch.tensor(r.stops, device=row.device, dtype=torch.long)
        if r.closed_at is None:  # still thinking
            if bool(row.index_select(0, r.stops_tensor).max() >= row.max()):
                r.forcing_from = n  # the model is ending the turn: end the thinking instead
                self._force(row, self.end_ids[0])
            else:
                row.index_fill_(0, r.stops_tensor, float("-inf"))
            return False
        if self._answer_started(r.out[r.closed_at:]):
            return True
        row.index_fill_(0, r.stops_tensor, float("-inf"))
        return False

    @staticmethod
    def _force(row: torch.Tensor, token: int) -> None:
        keep = row[token].clone()
        row.fill_(float("-inf"))
        row[token] = keep if torch.isfinite(keep) else 0.0

    def _answer_started(self, ids: list[int]) -> bool:
        if not ids:
            return False
        if self._tokenizer is None:
            from vllm.tokenizers import cached_tokenizer_from_config

            self._tokenizer = cached_tokenizer_from_config(model_config=self._model_config)
        return bool(self._tokenizer.decode(ids, skip_special_tokens=True).strip())
