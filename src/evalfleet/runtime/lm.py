"""`EvalfleetLM`: lm-eval's `LM` API over a batch runner and the request cache.

Strings become token-level items exactly as lm-eval's `hf` backend makes them (same
pair encoding, truncation, rolling windows, stop sequences, chat templates), so scores are
identical. Then: cache lookup, deduplication, token-budget batches, the runner, and a commit
of every finished batch to the cache before it is counted as done.

A sampled generation carries its own seed, drawn from the run's torch seed and the number of
earlier samples of the same prompt: repeats of a prompt (`repeats` in a task) are independent
draws, and each draw is the same whatever the batch, the layout or a resumption from the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from evalfleet.runtime.backends.base import GenerationItem, Item, LoglikelihoodItem
from evalfleet.runtime.batching import make_batches
from evalfleet.runtime.cache import RequestCache, request_key
from evalfleet.runtime.chat import render_chat, select_template
from evalfleet.runtime.runner import BatchRunner

DEFAULT_MAX_GEN_TOKS = 256
# lm-eval's sampling settings and the type each is kept as (so 1 and 1.0 make one cache key)
SAMPLING_SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "seed": int}

# (phase name, items done, items total, tokens computed so far)
ProgressCallback = Callable[[str, int, int, int], None]


@dataclass
class RunStats:
    requests: int = 0
    items: int = 0
    computed: int = 0
    cached: int = 0
    tokens: int = 0
    compute_seconds: float = 0.0
    by_type: dict[str, int] = field(default_factory=dict)
    # Computed tokens and the runner's seconds per kind of work ("loglikelihood": scored prompts,
    # rolling windows included; "generation": prompt plus generation budget), for calibration.
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    # perf_counter() when lm-eval first asked for results, and when the last answer went back
    first_call: float | None = None
    last_return: float | None = None


def work_kind(item: Item) -> str:
    """"generation" or "loglikelihood": the two kinds of work whose speeds are measured apart."""
    return "generation" if isinstance(item, GenerationItem) else "loglikelihood"


def seeded_draw(item: GenerationItem, draw: int) -> GenerationItem:
    """`item` as the `draw`-th sample of its prompt: the run's seed first, then seeds derived from it."""
    settings = dict(item.sampling)
    seed = settings["seed"]
    if draw:
        seed = int.from_bytes(hashlib.sha256(f"{seed}:{draw}".encode()).digest()[:8], "big") >> 1
    return dataclasses.replace(item, sampling=tuple(sorted({**settings, "seed": seed}.items())))


def _keep_last(encoding: list[int], count: int | None) -> list[int]:
    """lm-eval's left truncation: the last `count` tokens, or all of them when `count` is 0 or None."""
    return encoding[-count:] if count else encoding


class EvalfleetLM(TemplateLM):
    """lm-eval model whose work is done by a `BatchRunner` (one device or worker groups)."""

    def __init__(
        self,
        runner: BatchRunner,
        tokenizer: Any,
        identity: str,
        *,
        cache: RequestCache | None = None,
        token_budget: int = 4096,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        add_bos_token: bool | None = None,
        seed: int | None = 1234,
        chat_template: bool | str = False,
        chat_template_args: dict[str, Any] | None = None,
    ) -> None:
        """`seed` is the sampling seed (lm-eval's torch seed; None draws one); `chat_template` is
        `--apply-chat-template`'s choice, checked against the tokenizer here."""
        super().__init__()
        self.runner = runner
        self.tokenizer = tokenizer
        self.identity = identity
        self.cache = cache
        self.token_budget = token_budget
        self.max_batch_size = batch_size
        self.progress = progress
        self.add_bos_token = add_bos_token
        self.seed = secrets.randbits(63) if seed is None else seed
        self.template = select_template(tokenizer, chat_template, self.tokenizer_name) if chat_template else None
        self.chat_template_args = chat_template_args or {}
        self.stats = RunStats()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template this model renders with (chosen and checked when it was made), as lm-eval records it."""
        return self.template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat_history, add_generation_prompt, self.template, self.chat_template_args)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        special = self._special_tokens(string, add_special_tokens, self.tokenizer.decode(self.prefix_token_id))
        return _keep_last(self.tokenizer.encode(string, add_special_tokens=special), left_truncate_len)

    def _special_tokens(self, string: str, add_special_tokens: bool | None, prefix_text: str) -> bool:
        """Whether lm-eval's hf backend adds special tokens to `string`: as asked, else not when the
        string already starts with the prefix (BOS) token, else as the model's setting (default yes)."""
        if add_special_tokens is not None:
            return add_special_tokens
        if has_bos_prefix(string, prefix_text):
            return False
        return True if self.add_bos_token is None else self.add_bos_token

    def _encode_many(self, strings: Sequence[str], add_special_tokens: bool | None = None) -> dict[str, list[int]]:
        """`tok_encode` of every distinct string, in one batch call per special-token setting.

        Multiple-choice tasks repeat each context once per choice, and a fast tokenizer encodes a
        batch in parallel, so this costs a fraction of encoding the strings one by one.
        """
        prefix_text = self.tokenizer.decode(self.prefix_token_id)
        by_setting: dict[bool, list[str]] = {}
        for string in dict.fromkeys(strings):
            by_setting.setdefault(self._special_tokens(string, add_special_tokens, prefix_text), []).append(string)
        encoded: dict[str, list[int]] = {}
        for special, group in by_setting.items():
            encoded.update(zip(group, self.tokenizer(group, add_special_tokens=special)["input_ids"], strict=True))
        return encoded

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's `TemplateLM.loglikelihood`, token for token, with the strings encoded in batches."""
        pairs: list[tuple[str, str]] = []
        for context, continuation in (req.args for req in requests):
            # as `_encode_pair`: trailing spaces of the context belong to the continuation
            spaces = len(context) - len(context.rstrip())
            pairs.append((context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation))
        encoded = self._encode_many([text for c, cont in pairs if c for text in (c + cont, c)])
        alone = self._encode_many([cont for c, cont in pairs if not c], add_special_tokens=False)
        tokenized = []
        for (context, continuation), args in zip(pairs, (req.args for req in requests), strict=True):
            if context:
                context_enc = encoded[context]
                continuation_enc = encoded[context + continuation][len(context_enc) :]
            elif self.prefix_token_id != alone[continuation][0]:
                context_enc, continuation_enc = [self.prefix_token_id], alone[continuation]
            else:  # the continuation starts with the prefix token: it is the context
                context_enc, continuation_enc = alone[continuation][:1], alone[continuation][1:]
            tokenized.append((args, context_enc, continuation_enc))
        return self._loglikelihood_tokens(tokenized, disable_tqdm=disable_tqdm)

    def _loglikelihood_item(self, context: list[int], continuation: list[int]) -> LoglikelihoodItem:
        # As lm-eval's hf backend: keep the last max_length + 1 tokens; the final one is only a target.
        whole = (context + continuation)[-(self.max_length + 1) :]
        n = min(len(continuation), len(whole) - 1)
        split = len(whole) - n
        return LoglikelihoodItem(tuple(whole[:split]), tuple(whole[split:]))

    def _loglikelihood_tokens(self, requests: Sequence[Any], disable_tqdm: bool = False, **kwargs: Any) -> list:
        items = [self._loglikelihood_item(list(ctx), list(cont)) for _, ctx, cont in requests]
        self._count("loglikelihood", len(requests))
        return [tuple(result) for result in self._execute("loglikelihood", items)]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        self._count("loglikelihood_rolling", len(requests))
        items: list[LoglikelihoodItem] = []
        owners: list[int] = []
        texts = [text for (text,) in (req.args for req in requests)]
        encoded = self._encode_many(texts)
        for owner, text in enumerate(texts):
            windows = get_rolling_token_windows(
                token_list=encoded[text],
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                items.append(LoglikelihoodItem(tuple(context), tuple(continuation)))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._execute("loglikelihood_rolling", items), strict=True):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        self._count("generate_until", len(requests))
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        items = []
        draws: dict[GenerationItem, int] = {}  # samples of each sampled prompt so far
        encoded = self._encode_many([context for context, _ in (req.args for req in requests)])
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            context_ids = _keep_last(encoded[context], self.max_length - max_new)  # room left to generate
            item = GenerationItem(tuple(context_ids), tuple(until), max_new, self._sampling(kwargs))
            if item.sampling:
                draws[item] = draws.get(item, -1) + 1
                item = seeded_draw(item, draws[item])
            items.append(item)
        return list(self._execute("generate_until", items))

    def _sampling(self, kwargs: dict[str, Any]) -> tuple[tuple[str, float | int], ...]:
        """A task's sampling settings, seeded by the run's seed unless it names its own; () is greedy
        (so is temperature 0, as lm-eval reads it)."""
        if not kwargs.get("do_sample") or kwargs.get("temperature") == 0:
            return ()
        settings = {name: kind(kwargs[name]) for name, kind in SAMPLING_SETTINGS.items() if kwargs.get(name) is not None}
        settings.setdefault("seed", self.seed)
        return tuple(sorted(settings.items()))

    def _count(self, kind: str, n: int) -> None:
        if self.stats.first_call is None:
            self.stats.first_call = time.perf_counter()
        self.stats.requests += n
        self.stats.by_type[kind] = self.stats.by_type.get(kind, 0) + n

    def _execute(self, phase: str, items: list[Item]) -> list[Any]:
        """Results for `items` in order: from the cache where present, else computed and committed."""
        unique = list(dict.fromkeys(items))
        keys = [request_key(self.identity, item) for item in unique] if self.cache is not None else []
        known = self.cache.get_many(keys) if self.cache is not None else {}
        results: dict[Item, Any] = {item: known[key] for item, key in zip(unique, keys) if key in known}
        todo = [item for item in unique if item not in results]
        todo_keys = {item: key for item, key in zip(unique, keys) if item not in results}
        self.stats.items += len(unique)
        self.stats.cached += len(results)
        done = len(results)
        self._report(phase, done, len(unique))
        batches = make_batches(
            todo, self.token_budget, self.max_batch_size, self.runner.shares_prefixes, self.runner.reuses_prefixes
        )
        batch_items = [[todo[i] for i in batch] for batch in batches]

        def on_batch_done(index: int, batch_results: list[Any]) -> None:
            nonlocal done
            finished = batch_items[index]
            if self.cache is not None:
                self.cache.put_many({todo_keys[item]: value for item, value in zip(finished, batch_results, strict=True)})
            for item, value in zip(finished, batch_results, strict=True):
                results[item] = value
            done += len(finished)
            self.stats.computed += len(finished)
            self.stats.tokens += sum(item.length for item in finished)
            self._report(phase, done, len(unique))

        started = time.perf_counter()
        if batch_items:
            self.runner.run(batch_items, on_batch_done)
        self.stats.last_return = time.perf_counter()
        self.stats.compute_seconds += self.stats.last_return - started
        if todo:
            kind = self.stats.by_kind.setdefault(work_kind(todo[0]), {"tokens": 0, "seconds": 0.0})
            kind["tokens"] += sum(item.length for item in todo)
            kind["seconds"] += self.stats.last_return - started
        return [results[item] for item in items]

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total, self.stats.tokens)
