"""Training datasets from user feedback: DPO pairs and KTO examples, in TRL's format.

What it owns: turning the store's feedback (agentloop.serve.store.feedback, through rl/schema.py LoopStore) joined with
the logged completions into TRL's conversational datasets, and the policy for
what gets in — split, dedupe, length limit, per-caller cap, excluded callers.

Rows (TRL conversational format; TRL reads ``tools`` and ``chat_template_kwargs``):
- DPO: ``prompt`` (the request's messages as sent), ``chosen`` and ``rejected``
  (one assistant message each), ``tools``, ``chat_template_kwargs``.
- KTO: ``prompt``, ``completion`` (one assistant message), ``label`` (bool),
  ``tools``, ``chat_template_kwargs``. A correction gives two: the correction
  (desirable) and the answer it corrected (undesirable).
- Reference feedback is never a row itself: the caller's logged answers of that conversation
  are graded against it (the deployment's graders, rl/graded.py) and the grades make DPO pairs
  (best against worst across ``grade_margin``) or KTO examples (by score), ``graded`` true.
Both carry metadata columns (``source``, ``caller``, ``conversation_hash``,
``version``, ``feedback_ids``, ``graded``) that TRL drops before training.

Invariants
- A prompt renders exactly as the gateway rendered it: same messages, tools
  and template kwargs (``enable_thinking`` is derived by templates/reasoning.py request_template_kwargs,
  the gateway's own code, not a copy of its rule).
- The split depends only on an example's conversation hash (and the salt): one
  conversation is never on both sides, and an example keeps its side across
  runs and as the store grows.
- Deterministic: the same store and config give the same build, row for row.
- Never imports fastapi or torch; ``datasets`` is imported only by ``to_hf``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from agentloop.rl.graded import best_and_worst, kto_label, score_candidates
from agentloop.rl.graders import GraderSet, build_graders
from agentloop.rl.rows import (  # noqa: F401 - template_kwargs, is_positive, kto_weights: this module's API too
    assistant_message, bucket, canon, char_length, choice_message, group_key, is_positive, kto_weights, prompt_of,
    template_kwargs, tokenizer_length,
)

KINDS = ("dpo", "kto")
SOURCES = {"dpo": ("pairwise", "correction", "thumbs", "reference"),
           "kto": ("thumbs", "rating", "correction", "reference")}
TRL_COLUMNS = {"dpo": ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs"),
               "kto": ("prompt", "completion", "label", "tools", "chat_template_kwargs")}
META_COLUMNS = ("source", "caller", "conversation_hash", "version", "feedback_ids", "graded")
# How many of a caller's logged completions of one conversation are graded as its candidates.
MAX_LOGGED_CANDIDATES = 20


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class DatasetConfig:
    """What goes into a build. Every field has ``metadata["help"]`` (HfArgumentParser style)."""

    kind: str = _help("'dpo' (preference pairs) or 'kto' (unpaired desirable/undesirable examples).",
                      default="dpo")
    sources: tuple[str, ...] | None = _help(
        "Feedback types to use; None uses all that apply: dpo: pairwise, correction, thumbs "
        "(same-prompt up vs down), reference; kto: thumbs, rating, correction, reference. A reference "
        "is never trained on verbatim: the caller's logged answers of that conversation are graded "
        "against it (rl/graded.py) and the grades make the rows, marked graded.", default=None)
    since: float | None = _help("Only feedback created at or after this Unix time.", default=None)
    versions: tuple[str, ...] | None = _help(
        "Only feedback on completions of these model versions (e.g. 'v0003'); None takes all.", default=None)
    eval_percent: int = _help(
        "Percent of conversations (by conversation hash, not of examples) held out for eval, 0..100.", default=5)
    split_salt: str = _help("Salt of the split hash; change it to draw a different held-out set.", default="")
    max_length: int | None = _help(
        "Drop examples whose rendered prompt+completion is longer, in tokens (the tokenizer's count if one "
        "is given to build_dataset, else characters/4). None keeps all.", default=4096)
    max_per_caller: int | None = _help(
        "At most this many examples per caller (chosen by hash), applied before the held-out split: it "
        "bounds a caller's share of the training and held-out sets alike.", default=None)
    max_caller_fraction: float | None = _help(
        "At most this fraction (0..1] of the examples (counted before the cap) per caller, at least 1; "
        "applied before the split, like max_per_caller.", default=None)
    exclude_callers: tuple[str, ...] = _help("Caller ids whose feedback is never used (untrusted).", default=())
    rating_desirable_min: int = _help("KTO: ratings >= this are desirable.", default=4)
    rating_undesirable_max: int = _help("KTO: ratings <= this are undesirable; those between are dropped.",
                                        default=2)
    dedupe: bool = _help("Drop examples identical (same TRL columns) to an earlier one.", default=True)
    trained_feedback_ids: tuple[str, ...] = _help(
        "Feedback the starting adapter has already been trained on (the loop passes the live version's "
        "lineage when it trains on new feedback only): a training example made only from these is dropped "
        "('already_trained'). Held-out examples stay: the gate still scores them.", default=())
    positives: bool = _help(
        "DPO: keep a thumbs-up answer that has no thumbs-down to pair with as a positive-only row (chosen == "
        "rejected, source 'thumbs_up'). It holds no preference, so DPO's term is zero on it, but the NLL term "
        "(DPOJobConfig.sft_weight > 0) learns from it: what users approved is kept, not only what they "
        "corrected. Such rows go to the training split only (never the gate's held-out pairs).", default=False)
    grade_margin: float = _help(
        "DPO from grades: the best graded answer is paired against the worst only when their scores (0..1) "
        "differ by at least this; a smaller difference is the graders' noise, not a preference.", default=0.25)
    graded_desirable_min: float = _help(
        "KTO from grades: an answer scoring at least this is desirable (with `positives`, a DPO best that has "
        "no pair is kept as a positive-only row when it scores at least this).", default=1.0)
    graded_undesirable_max: float = _help(
        "KTO from grades: an answer scoring at most this is undesirable; one between is left out.", default=0.5)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        for name in ("sources", "versions"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, str) or not all(isinstance(x, str) for x in v):
                    raise ValueError(f"{name} must be a sequence of strings")
                setattr(self, name, tuple(v))
        if isinstance(self.exclude_callers, str):
            raise ValueError("exclude_callers must be a sequence of caller ids, not one string")
        self.exclude_callers = tuple(self.exclude_callers)
        if isinstance(self.trained_feedback_ids, str):
            raise ValueError("trained_feedback_ids must be a sequence of feedback ids, not one string")
        self.trained_feedback_ids = tuple(self.trained_feedback_ids)
        if self.sources is not None:
            bad = set(self.sources) - set(SOURCES[self.kind])
            if bad or not self.sources:
                raise ValueError(f"sources for {self.kind} must be a non-empty subset of {SOURCES[self.kind]}")
        if not (isinstance(self.eval_percent, int) and 0 <= self.eval_percent <= 100):
            raise ValueError("eval_percent must be an integer in 0..100")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError("max_length must be >= 1 or None")
        if self.max_per_caller is not None and self.max_per_caller < 1:
            raise ValueError("max_per_caller must be >= 1 or None")
        if self.max_caller_fraction is not None and not 0 < self.max_caller_fraction <= 1:
            raise ValueError("max_caller_fraction must be in (0, 1] or None")
        if not 0 < self.grade_margin <= 1:
            raise ValueError("grade_margin must be in (0, 1]")
        if not 0 <= self.graded_undesirable_max < self.graded_desirable_min <= 1:
            raise ValueError("need 0 <= graded_undesirable_max < graded_desirable_min <= 1")
        if not 1 <= self.rating_undesirable_max < self.rating_desirable_min <= 5:
            raise ValueError("need 1 <= rating_undesirable_max < rating_desirable_min <= 5")

    @property
    def active_sources(self) -> tuple[str, ...]:
        return self.sources or SOURCES[self.kind]


@dataclass
class DatasetBuild:
    """A built dataset: rows per split, what was used, and why the rest was not.

    ``stats``: ``feedback_seen``; ``by_source`` and ``per_caller`` (kept
    examples); ``dropped`` by reason (feedback rows for reasons decided before
    examples exist — excluded_caller, version, source_not_selected, superseded,
    completion_missing, unusable_completion, rating_neutral, unpaired_thumbs — and
    examples after: identical_sides, conversation_mismatch, template_kwargs_mismatch,
    thinking_without_reasoning, duplicate,
    too_long, caller_cap, positive_held_out, already_trained); ``train``/``eval`` sizes; for KTO the train
    ``desirable``/``undesirable`` counts.
    """

    kind: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    stats: dict[str, Any]
    dataset_ids: list[str]  # feedback ids behind the kept examples, sorted
    config: dict[str, Any]
    desirable_weight: float = 1.0  # KTO: pass to KTOConfig
    undesirable_weight: float = 1.0

    def to_jsonl(self, path: str | Path) -> dict[str, Path]:
        """Write ``train.jsonl``, ``eval.jsonl`` and ``build.json`` into directory ``path``.

        The .jsonl files load with ``datasets.load_dataset("json", ...)``.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        files = {"train": out / "train.jsonl", "eval": out / "eval.jsonl", "build": out / "build.json"}
        for split in ("train", "eval"):
            with open(files[split], "w", encoding="utf-8") as f:
                for row in getattr(self, split):
                    f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        meta = {k: v for k, v in asdict(self).items() if k not in ("train", "eval")}
        files["build"].write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        return files

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "DatasetBuild":
        p = Path(path)
        meta = json.loads((p / "build.json").read_text(encoding="utf-8"))
        splits = {s: [json.loads(line) for line in (p / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()
                      if line.strip()] for s in ("train", "eval")}
        return cls(**meta, **splits)

    def to_hf(self, split: str = "train"):
        """One split as a ``datasets.Dataset`` that TRL's DPOTrainer/KTOTrainer take.

        ``tools`` is stored as a JSON string (TRL decodes it): tool schemas differ
        from row to row, which one Arrow column type cannot hold. Message contents
        must be strings or null (no content-part lists) for the same reason.
        """
        from datasets import Dataset  # heavy; only needed here

        if split not in ("train", "eval"):
            raise ValueError("split must be 'train' or 'eval'")
        rows = [{**r, "tools": None if r["tools"] is None else json.dumps(r["tools"], ensure_ascii=False)}
                for r in getattr(self, split)]
        if not rows:
            return Dataset.from_dict({c: [] for c in (*TRL_COLUMNS[self.kind], *META_COLUMNS)})
        return Dataset.from_list(rows)


# ---------------------------------------------------------------- build

@dataclass
class _Ex:
    row: dict[str, Any]
    order: tuple  # (created_at of the newest feedback, ids): chronological, total
    key: str = ""


class _Builder:
    def __init__(self, config: DatasetConfig, length, store=None, graders: GraderSet | None = None,
                 samples: dict[tuple, list[dict[str, Any]]] | None = None) -> None:
        self.cfg = config
        self.length = length
        self.store = store
        self.graders = graders
        self.samples = samples or {}  # group key -> answers sampled from the live version (rl/sampling.py)
        self.graded: Counter = Counter()  # conversations and candidates graded, candidates no grader scored
        self.dropped: Counter = Counter()
        self.examples: list[_Ex] = []
        self.seen = 0  # feedback rows read

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def select(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply the feedback-level filters; keep each caller's latest word on a target."""
        cfg, latest = self.cfg, {}
        for fb in rows:
            self.seen += 1
            if fb["caller"] in cfg.exclude_callers:
                self.drop("excluded_caller")
            elif fb["type"] not in cfg.active_sources:
                self.drop("source_not_selected")
            elif cfg.versions is not None and fb["version"] not in cfg.versions:
                self.drop("version")
            else:
                if fb["type"] == "pairwise":
                    # A reversed pair is the same question answered again.
                    target = tuple(sorted([(fb["chosen_id"], fb["chosen_index"] or 0),
                                           (fb["rejected_id"], fb["rejected_index"] or 0)]))
                else:
                    target = fb["completion_id"]
                k = (fb["caller"], fb["type"], target)
                if k in latest:
                    # A changed vote (or a re-sent correction) replaces the earlier one;
                    # rows arrive oldest first, so the later one wins.
                    self.drop("superseded")
                latest[k] = fb
        return sorted(latest.values(), key=lambda f: (f["created_at"], f["id"]))

    def usable(self, *completions: dict[str, Any] | None) -> bool:
        if any(c is None for c in completions):
            self.drop("completion_missing")
            return False
        if any(c["status_code"] != 200 or not isinstance(c.get("request"), dict) for c in completions):
            self.drop("unusable_completion")
            return False
        return True

    def add(self, fbs: list[dict[str, Any]], source: str, base: dict[str, Any], graded: bool = False,
            **cols: Any) -> None:
        if base["chat_template_kwargs"].get("enable_thinking") and any(
                not isinstance(m[0].get("reasoning_content"), str) for m in cols.values() if isinstance(m, list)):
            # With thinking on, serving's generation prompt opens a <think> block:
            # an answer without reasoning cannot follow it, so it cannot be trained
            # in the context it is served in (rl/common.py rejects such rows).
            self.drop("thinking_without_reasoning")
            return
        newest = max(fbs, key=lambda f: (f["created_at"], f["id"]))
        row = {**{k: base[k] for k in ("prompt", "tools", "chat_template_kwargs")}, **cols, "source": source,
               "caller": newest["caller"], "conversation_hash": base["conversation_hash"],
               "version": newest["version"], "feedback_ids": [f["id"] for f in fbs], "graded": graded}
        self.examples.append(_Ex(row, (newest["created_at"], *row["feedback_ids"])))

    # ------------------------------------------------------------ sources

    def dpo(self, fbs: list[dict[str, Any]]) -> None:
        thumbs: dict[tuple, dict[int, list]] = defaultdict(lambda: {1: [], -1: []})
        for fb in fbs:
            if fb["type"] == "pairwise":
                a, b = fb["chosen_completion"], fb["rejected_completion"]
                if not self.usable(a, b):
                    continue
                chosen, rejected = choice_message(a, fb["chosen_index"] or 0), choice_message(b, fb["rejected_index"] or 0)
                pa, pb = prompt_of(a), prompt_of(b)
                if chosen is None or rejected is None:
                    self.drop("unusable_completion")
                elif pa["prompt"] != pb["prompt"] or pa["tools"] != pb["tools"]:
                    self.drop("conversation_mismatch")  # the API refuses these; rows may come from elsewhere
                elif pa["chat_template_kwargs"] != pb["chat_template_kwargs"]:
                    # Same messages, rendered differently (e.g. thinking on vs off):
                    # DPO needs one prompt for both sides.
                    self.drop("template_kwargs_mismatch")
                else:
                    self.pair([fb], "pairwise", pa, chosen, rejected)
            elif fb["type"] == "correction":
                c = fb["completion"]
                if self.usable(c):
                    answer, fixed = choice_message(c, 0), assistant_message(fb["correction"])
                    if answer is None or fixed is None:
                        self.drop("unusable_completion")
                    else:
                        self.pair([fb], "correction", prompt_of(c), fixed, answer)
            elif fb["type"] == "thumbs" and self.usable(fb["completion"]):
                p = prompt_of(fb["completion"])
                # Pair within one caller and one rendered prompt: a user's up and down
                # are judgements on one scale, and caps/exclusions stay attributable.
                group = (fb["caller"], p["conversation_hash"], canon(p["chat_template_kwargs"]))
                thumbs[group][fb["value"]].append((fb, p))
        for group in sorted(thumbs):
            ups, downs = thumbs[group][1], thumbs[group][-1]
            if not ups or not downs:
                if self.cfg.positives and ups:
                    for up, p in ups:
                        answer = choice_message(up["completion"], 0)
                        if answer is None:
                            self.drop("unusable_completion")
                        else:
                            self.add([up], "thumbs_up", p, chosen=[answer], rejected=[answer])
                else:
                    self.drop("unpaired_thumbs", len(ups) + len(downs))
                continue
            # Each down is paired with an up, in time order, reusing ups when there
            # are fewer: deterministic, and every negative signal is used.
            for i, (down, p) in enumerate(downs):
                up = ups[i % len(ups)][0]
                chosen, rejected = choice_message(up["completion"], 0), choice_message(down["completion"], 0)
                if chosen is None or rejected is None:
                    self.drop("unusable_completion")
                else:
                    self.pair([up, down], "thumbs", p, chosen, rejected)

    def pair(self, fbs, source, p, chosen, rejected) -> None:
        if canon(chosen) == canon(rejected):
            self.drop("identical_sides")  # no preference signal in it
        else:
            self.add(fbs, source, p, chosen=[chosen], rejected=[rejected])

    def kto(self, fbs: list[dict[str, Any]]) -> None:
        cfg = self.cfg
        for fb in fbs:
            c = fb["completion"]
            if not self.usable(c):
                continue
            if fb["type"] == "correction":
                msg, label = assistant_message(fb["correction"]), True
                # The answer the user corrected is an undesirable example: the same signal as
                # DPO's correction pair, so a set of corrections alone has both KTO classes.
                answer = choice_message(c, 0)
                if answer is not None and msg is not None and canon(answer) != canon(msg):
                    self.add([fb], "correction", prompt_of(c), completion=[answer], label=False)
            else:
                msg, v = choice_message(c, 0), fb["value"]
                if fb["type"] == "thumbs":
                    label = v == 1
                elif v >= cfg.rating_desirable_min or v <= cfg.rating_undesirable_max:
                    label = v >= cfg.rating_desirable_min
                else:
                    self.drop("rating_neutral")
                    continue
            if msg is None:
                self.drop("unusable_completion")
                continue
            self.add([fb], fb["type"], prompt_of(c), completion=[msg], label=label)

    def reference(self, fbs: list[dict[str, Any]]) -> None:
        """Reference feedback: per caller and rendered conversation, the caller's logged answers graded
        against their newest reference (rl/graded.py); never the reference itself."""
        cfg, groups = self.cfg, defaultdict(list)
        for fb in fbs:
            if self.usable(fb["completion"]):
                p = prompt_of(fb["completion"])
                groups[group_key(fb["caller"], p)].append((fb, p))
        for key in sorted(groups):
            refs = [fb for fb, _ in groups[key]]
            fb, p = groups[key][-1]  # oldest first: the caller's newest word on the conversation
            reference = assistant_message(fb["reference"])
            if reference is None:
                self.drop("unusable_completion", len(refs))
                continue
            logged = self.candidates(fb["caller"], p, [f["completion"] for f in refs])
            seen = {canon(m) for m in logged}
            sampled = [m for m in (assistant_message(x) for x in self.samples.get(key, [])) if m is not None]
            sampled = list({canon(m): m for m in sampled if canon(m) not in seen}.values())
            scored = score_candidates(self.graders, fb["completion"]["request"], logged + sampled, reference)
            unscored = sum(s.score is None for s in scored)
            self.graded.update(conversations=1, candidates=len(scored), sampled=len(sampled), unscored=unscored,
                               failed_grades=sum(s.failed for s in scored))
            if cfg.kind == "kto":
                for s in scored:
                    label = kto_label(s.score, cfg.graded_desirable_min, cfg.graded_undesirable_max)
                    if label is None:
                        self.drop("graded_neutral" if s.score is not None else "ungraded")
                    else:
                        self.add(refs, "reference", p, graded=True, completion=[s.message], label=label)
                continue
            pair = best_and_worst(scored, cfg.grade_margin)
            best = max((s for s in scored if s.score is not None), key=lambda s: s.score, default=None)
            if pair is not None:
                self.add(refs, "reference", p, graded=True, chosen=[pair[0].message], rejected=[pair[1].message])
            elif cfg.positives and best is not None and best.score >= cfg.graded_desirable_min:
                self.add(refs, "reference", p, graded=True, chosen=[best.message], rejected=[best.message])
            else:
                self.drop("no_graded_pair", len(refs))

    def candidates(self, caller: str, p: dict[str, Any], known: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The distinct answers (every choice) of `caller`'s logged completions rendered as `p`, oldest first."""
        logged = self.store.completions_of_conversation(caller, p["conversation_hash"], limit=MAX_LOGGED_CANDIDATES)
        comps = {c["id"]: c for c in known + logged}
        out: dict[str, dict[str, Any]] = {}
        for c in sorted(comps.values(), key=lambda c: (c["created_at"], c["id"])):
            if c["status_code"] != 200 or not isinstance(c.get("request"), dict) or prompt_of(c) != p:
                continue
            for ch in sorted((ch for ch in (c.get("response") or {}).get("choices") or [] if isinstance(ch, dict)),
                             key=lambda ch: ch.get("index", 0)):
                m = assistant_message(ch.get("message"))
                if m is not None:
                    out.setdefault(canon(m), m)
        return list(out.values())

    # ------------------------------------------------------------ policy

    def finish(self) -> tuple[list[dict], list[dict]]:
        cfg, kind = self.cfg, self.cfg.kind
        exs = sorted(self.examples, key=lambda e: e.order)
        for e in exs:
            e.key = canon({k: e.row[k] for k in TRL_COLUMNS[kind]})
        if cfg.dedupe:
            seen, kept = set(), []
            for e in exs:  # the oldest copy stays
                if e.key in seen:
                    self.drop("duplicate")
                else:
                    seen.add(e.key)
                    kept.append(e)
            exs = kept
        if cfg.max_length is not None:
            kept = []
            for e in exs:
                r = e.row
                sides = [r["chosen"], r["rejected"]] if kind == "dpo" else [r["completion"]]
                n = max(self.length(r["prompt"] + s, r["tools"], r["chat_template_kwargs"]) for s in sides)
                if n > cfg.max_length:
                    self.drop("too_long")
                else:
                    kept.append(e)
            exs = kept
        exs = self.cap(exs)
        held = [bucket(e.row["conversation_hash"], cfg.split_salt) < cfg.eval_percent for e in exs]
        eval_ = [e.row for e, h in zip(exs, held) if h and not is_positive(e.row)]
        # A positive-only row is no held-out pair: it trains, unless its conversation is held out.
        held_convs = {r["conversation_hash"] for r in eval_}
        train = [e.row for e, h in zip(exs, held)
                 if not h or (is_positive(e.row) and e.row["conversation_hash"] not in held_convs)]
        if len(exs) > len(train) + len(eval_):
            self.drop("positive_held_out", len(exs) - len(train) - len(eval_))
        if cfg.trained_feedback_ids:
            # After the split, so the split (and the gate's held-out pairs) do not depend on it.
            done = set(cfg.trained_feedback_ids)
            fresh = [r for r in train if not set(r["feedback_ids"]) <= done]
            self.drop("already_trained", len(train) - len(fresh))
            train = fresh
        return train, eval_

    def cap(self, exs: list[_Ex]) -> list[_Ex]:
        cfg = self.cfg
        limits = []
        if cfg.max_per_caller is not None:
            limits.append(cfg.max_per_caller)
        if cfg.max_caller_fraction is not None:
            limits.append(max(1, math.floor(cfg.max_caller_fraction * len(exs))))
        if not limits:
            return exs
        limit = min(limits)
        by_caller: dict[str, list[_Ex]] = defaultdict(list)
        for e in exs:
            by_caller[e.row["caller"]].append(e)
        keep: set[int] = set()
        for items in by_caller.values():
            # Hash order, not time order: a capped caller contributes a sample
            # spread over their history, the same one on every run.
            ranked = sorted(items, key=lambda e: hashlib.sha256(f"{cfg.split_salt}:{e.key}".encode()).hexdigest())
            keep.update(id(e) for e in ranked[:limit])
            self.drop("caller_cap", max(0, len(items) - limit))
        return [e for e in exs if id(e) in keep]


def build_dataset(store, config: DatasetConfig | None = None, *, tokenizer: Any = None,
                  graders: GraderSet | None = None, samples: dict[tuple, list[dict]] | None = None) -> DatasetBuild:
    """Build a DPO or KTO dataset from ``store`` (any rl.schema.LoopStore: the gateway's Store) per ``config``.

    ``tokenizer`` (optional, with ``apply_chat_template``) makes ``max_length``
    count real tokens of the rendered chat instead of the chars/4 estimate.
    ``graders`` grade the answers reference feedback is about (the deployment's; None: the
    built-in defaults, rl/graders DEFAULT_SPECS). ``samples`` (rl/sampling.py: group key -> answers
    of the live version) join the logged answers of those conversations as graded candidates.
    """
    cfg = config or DatasetConfig()
    b = _Builder(cfg, tokenizer_length(tokenizer) if tokenizer is not None else char_length, store,
                 graders if graders is not None else build_graders(), samples)
    fbs = b.select(store.iter_feedback_with_completions(since=cfg.since))
    (b.dpo if cfg.kind == "dpo" else b.kto)([f for f in fbs if f["type"] != "reference"])
    b.reference([f for f in fbs if f["type"] == "reference"])
    train, eval_ = b.finish()
    rows = train + eval_
    stats: dict[str, Any] = {
        "kind": cfg.kind, "feedback_seen": b.seen, "train": len(train), "eval": len(eval_),
        "by_source": dict(sorted(Counter(r["source"] for r in rows).items())),
        "per_caller": dict(sorted(Counter(r["caller"] for r in rows).items())),
        "dropped": dict(sorted(b.dropped.items())),
        "graded": {k: b.graded[k] for k in ("conversations", "candidates", "sampled", "unscored", "failed_grades")},
    }
    weights = (1.0, 1.0)
    if cfg.kind == "kto":
        n_d = sum(r["label"] for r in train)
        stats.update(desirable=n_d, undesirable=len(train) - n_d)
        weights = kto_weights(n_d, len(train) - n_d)
    ids = sorted({i for r in rows for i in r["feedback_ids"]})
    return DatasetBuild(kind=cfg.kind, train=train, eval=eval_, stats=stats, dataset_ids=ids,
                        config=json.loads(json.dumps(asdict(cfg))),  # JSON-shaped: survives to_jsonl
                        desirable_weight=weights[0], undesirable_weight=weights[1])
