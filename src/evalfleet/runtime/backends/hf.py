"""transformers `AutoModelForCausalLM` on cpu or cuda.

Log-likelihood batches are left-padded with explicit position ids, so every continuation
ends at the last position and the model is asked for logits there only (`logits_to_keep`):
the log-softmax never runs over a whole sequence × vocabulary. Items that share a context
are packed into one row under a 4D mask; a prefix shared by the whole batch (few-shot
examples) is computed once and its KV cache is expanded over the rows. Generation is greedy
decoding with stop strings checked on the decoded text, continuously batched (`decode.py`: rows
leave as they stop) where the model allows it, else `generate`'s static batches; rows that
sample are drawn with their own seeds (`sampling.py`).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, StoppingCriteria, StoppingCriteriaList

from evalfleet.runtime import collector, heap
from evalfleet.runtime.backends import cascade
from evalfleet.runtime.backends.base import Backend, GenerationItem, LoglikelihoodItem, OutOfMemory
from evalfleet.runtime.backends.decode import (
    STOP_WINDOW,
    ContinuousDecoder,
    decodes_plainly,
    finished_text,
    meets_stop,
    plain_cache,
)
from evalfleet.runtime.backends.sampling import sampling_processors
from evalfleet.runtime.batching import MIN_SHARED_PREFIX, shared_prefix_length
from evalfleet.types import EvalfleetError, UsageError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
DEFAULT_MAX_LENGTH = 2048
# Packed and unpacked scores differ by float rounding only (~1e-6 in float32, ~1e-2 in bfloat16);
# a dropped mask moves them by far more.
PACKING_TOLERANCE = 2e-2
log = logging.getLogger("evalfleet")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype to load in; refuse one the device cannot run."""
    on_gpu = device.startswith("cuda")
    if dtype == "auto":
        if not on_gpu:
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float16" and not on_gpu:
        raise UsageError("float16 is not supported on the CPU; use --dtype float32 or bfloat16")
    if dtype == "bfloat16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU cannot run bfloat16; use --dtype float16 or float32")
    return dtype


def check_model_folder(path: str) -> None:
    """Fail early, in one sentence, on the usual mistakes with a local model folder."""
    folder = Path(path)
    if not folder.exists():
        if path.startswith((".", "/", "~")) or folder.suffix or path.count("/") != 1:
            raise UsageError(f"model path '{path}' does not exist")
        return  # looks like a hub id: let transformers resolve it
    if not folder.is_dir():
        raise UsageError(f"model path '{path}' is not a folder")
    if not (folder / "config.json").exists():
        raise UsageError(f"model folder '{path}' has no config.json")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UsageError(f"model folder '{path}' has a config but no weights (*.safetensors or *.bin)")


def model_max_length(config: Any, tokenizer: Any, override: int | None = None) -> int:
    """Same rule as lm-eval's HFLM: the config's context size, else the tokenizer's, else 2048."""
    if override:
        return override
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def import_model_code(config: Any) -> bool:
    """Import the transformers code of the model `config` describes, without building it; False
    for a model transformers does not know (its own code comes with the checkpoint)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return False
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the mapping imports a class's module as it is asked for
    return True


class _StopOnStrings(StoppingCriteria):
    """Stops when every row has produced one of its stop strings (or its token limit)."""

    def __init__(self, tokenizer: Any, prompt_length: int, items: list[GenerationItem]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.items = items

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_length :]
        done = []
        for row, item in zip(new, self.items, strict=True):
            if len(row) >= item.max_new_tokens:
                done.append(True)
                continue
            done.append(meets_stop(item, self.tokenizer.decode(row[-STOP_WINDOW:].tolist())))
        return torch.tensor(done, device=input_ids.device)


class HFBackend(Backend):
    """A loaded transformers causal LM and its tokenizer."""

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str,
        max_length: int | None = None,
        share_prefixes: bool = False,
        reuse_prefixes: bool = False,
        continuous: bool = False,
    ) -> None:
        self.model = model
        self.share_prefixes = share_prefixes
        self.reuse_prefixes = share_prefixes and reuse_prefixes
        self._packing_checked = False
        # rows leave a generation batch as they stop (decode.py); a model split into pipeline stages
        # or by a device_map, a cache with sliding windows or a generation config that changes
        # scores decodes with `generate`'s static batches
        self.continuous = continuous and plain_cache(model) and decodes_plainly(model.generation_config)
        # a generation batch's shared prefix held once and read once per step (cascade.py)
        self.cascade = self.continuous and self.reuse_prefixes and cascade.enable(model)
        self.decode_steps = self.decoded_rows = 0
        self.generation_prefix_checked = False
        self.cache_token_bytes: float | None = None  # a KV cache token's bytes, measured on the first prefill
        self.token_texts: dict[int, str] = {}  # a token's text alone and after itself (the stop-string check's)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._max_length = model_max_length(model.config, tokenizer, max_length)
        accepted = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in accepted
        # transformers renamed `past_key_values` to `cache` (5.2x); the GPU machines run 5.17
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"

    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        share_prefixes: bool = False,
        **from_pretrained: Any,
    ) -> HFBackend:
        check_model_folder(path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if device == "cpu":
            heap.keep_freed_blocks()  # a CPU forward's activations reuse freed blocks (heap.py)
        with collector.paused():  # the model's code: hundreds of thousands of objects (collector.py)
            try:
                config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
                tokenizer = load_tokenizer(path, revision, trust_remote_code)
                if import_model_code(config):
                    collector.keep_imported()
                model = AutoModelForCausalLM.from_pretrained(
                    path,
                    config=config,
                    revision=revision,
                    dtype=TORCH_DTYPES[dtype],
                    trust_remote_code=trust_remote_code,
                    **from_pretrained,
                )
            except (OSError, ValueError, SafetensorError) as error:  # a missing file, a bad config, cut-short weights
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise EvalfleetError(f"could not load model '{path}': {first_line}") from error
            whole = not any(key in from_pretrained for key in ("device_mesh", "tp_plan", "device_map"))
            if whole:  # a device_map places the weights itself; inputs go to `device`, its first device
                model.to(device)
            model.eval()
            # device_maps decode with `generate`; tp ranks and pp stages run the decode loop in step, since
            # every decision it takes (stops, row moves, joins) follows from the logits, which tp
            # gathers and pp broadcasts from the last stage to every rank alike
            return cls(model, tokenizer, device, max_length, share_prefixes, reuse_prefixes=whole, continuous=whole)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        described = {"backend": self.name, "dtype": str(self.model.dtype).removeprefix("torch.")}
        if self.continuous:
            described["continuous_batching"] = True
        if self.decode_steps:
            described["rows_per_decode_step"] = round(self.decoded_rows / self.decode_steps, 2)
        return described

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _forward_last(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int, past: Any = None
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}
        if past is not None:
            kwargs.update({self._cache_arg: past, "use_cache": True})
        if self._keeps_logits:
            kwargs["logits_to_keep"] = keep
        return self.model(**kwargs).logits[:, -keep:, :]

    @torch.inference_mode()
    def loglikelihood(self, items: list[LoglikelihoodItem]) -> list[tuple[float, bool]]:
        if self.share_prefixes:
            prefix = self._reusable_prefix(items)
            packed = self._loglikelihood_packed(items, prefix)
            if self._packing_checked or self._packing_agrees(items, packed, prefix):
                return packed
            self.share_prefixes = self.reuse_prefixes = False
            log.warning("%s ignores custom attention masks; computing shared contexts one by one", self.describe())
        return self._loglikelihood_plain(items)

    def _reusable_prefix(self, items: list[LoglikelihoodItem]) -> int:
        """Tokens every context of the batch starts with, if worth computing once (else 0)."""
        if not self.reuse_prefixes or len(items) < 2:
            return 0
        shared = shared_prefix_length([item.context for item in items])
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _packing_agrees(self, items: list[LoglikelihoodItem], packed: list[tuple[float, bool]], prefix: int) -> bool:
        """Once per backend: the first shared context, packed, must score as it does unpacked.

        An attention implementation that drops a custom 4D mask (some fused kernels do) would
        let continuations see each other, or queries miss the reused prefix; this catches it
        before any result counts.
        """
        first = items[0].context
        sample = [i for i, item in enumerate(items) if item.context == first][:4]
        if len(sample) < 2 and not prefix:
            return True
        self._packing_checked = True
        plain = self._loglikelihood_plain([items[i] for i in sample])
        return all(
            abs(packed[i][0] - value) <= PACKING_TOLERANCE * (1 + abs(value)) for i, (value, _) in zip(sample, plain, strict=True)
        )

    def _loglikelihood_plain(self, items: list[LoglikelihoodItem]) -> list[tuple[float, bool]]:
        # The last token is never an input: position i predicts token i + 1.
        inputs = [list(item.context + item.continuation)[:-1] for item in items]
        keep = max(1, max(len(item.continuation) for item in items))
        ids, mask, positions = self._left_pad(inputs)
        logprobs = self._logprobs(ids, mask, positions, keep)
        predictors = [(row, list(range(keep - len(item.continuation), keep))) for row, item in enumerate(items)]
        return self._score(logprobs, predictors, items)

    def _logprobs(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int, past: Any = None) -> torch.Tensor:
        try:
            logits = self._forward_last(ids, mask, positions, keep, past)
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(str(error)) from error
        return F.log_softmax(logits.float(), dim=-1)

    @staticmethod
    def _score(
        logprobs: torch.Tensor, predictors: list[tuple[int, list[int]]], items: list[LoglikelihoodItem]
    ) -> list[tuple[float, bool]]:
        """All items at once: one gather, one argmax, one segment sum, one copy to the host."""
        rows = torch.tensor([row for row, positions in predictors for _ in positions], dtype=torch.long)
        columns = torch.tensor([p for _, positions in predictors for p in positions], dtype=torch.long)
        owner = torch.tensor([i for i, (_, positions) in enumerate(predictors) for _ in positions], dtype=torch.long)
        target = torch.tensor([token for item in items for token in item.continuation], dtype=torch.long)
        device = logprobs.device
        picked = logprobs[rows.to(device), columns.to(device)]
        token_scores = picked.gather(-1, target.to(device).unsqueeze(-1)).squeeze(-1).double()
        misses = (picked.argmax(-1) != target.to(device)).long()
        owner = owner.to(device)
        scores = torch.zeros(len(items), dtype=torch.float64, device=device).index_add_(0, owner, token_scores)
        wrong = torch.zeros(len(items), dtype=torch.long, device=device).index_add_(0, owner, misses)
        return [(float(s), w == 0) for s, w in zip(scores.tolist(), wrong.tolist(), strict=True)]

    def _position_offset(self, prefix: int) -> int:
        """Where positions restart after a reused prefix: right after it."""
        return prefix

    # Whether the model's forward must be given `new_cache()` rather than make its own (a pipeline stage's).
    given_cache = False

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for this model's layers (a pipeline stage's measures its own, parallel.py)."""
        return DynamicCache(config=self.model.config)

    def _prefix_cache(self, tokens: tuple[int, ...], rows: int) -> Any:
        """The KV cache of `tokens`, computed once and repeated for each of `rows` rows."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
        if self.given_cache:
            kwargs[self._cache_arg] = self.new_cache()
        if self._keeps_logits:
            kwargs["logits_to_keep"] = 1
        try:
            past = self.model(**kwargs)[self._cache_arg]
            past.batch_repeat_interleave(rows)
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(str(error)) from error
        return past

    def _loglikelihood_packed(self, items: list[LoglikelihoodItem], prefix: int = 0) -> list[tuple[float, bool]]:
        """Items that share a context are one row: the context once, then each continuation.

        A 4D mask lets every continuation see the context and its own earlier tokens only, and
        its positions restart where the context ends, so each scores as if it ran alone; a
        multiple-choice question with four answers costs one context instead of four. With a
        `prefix`, the first `prefix` tokens of every context come from one cached forward pass
        and the rows hold only what follows them.
        """
        rows: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            rows.setdefault(item.context[prefix:], []).append(index)
        packed = list(rows.items())
        offset = self._position_offset(prefix) if prefix else 0
        lengths = [len(c) + sum(len(items[i].continuation) for i in m) for c, m in packed]
        width = max(lengths)
        keep = max(1 + length - len(c) for length, (c, _) in zip(lengths, packed, strict=True))
        ids = torch.full((len(packed), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(packed), width), dtype=torch.long)
        segment = torch.full((len(packed), width), -1, dtype=torch.long)  # -1 pad, 0 context, i + 1 continuation i
        predictors: list[tuple[int, list[int]]] = [(0, [])] * len(items)
        window = width - keep
        for row, ((context, members), length) in enumerate(zip(packed, lengths, strict=True)):
            start = width - length
            end_of_context = start + len(context)
            ids[row, start:end_of_context] = torch.tensor(context)
            positions[row, start:end_of_context] = torch.arange(offset, offset + len(context))
            segment[row, start:end_of_context] = 0
            cursor = end_of_context
            for number, index in enumerate(members, start=1):
                continuation = items[index].continuation
                span = slice(cursor, cursor + len(continuation))
                ids[row, span] = torch.tensor(continuation)
                positions[row, span] = torch.arange(offset + len(context), offset + len(context) + len(continuation))
                segment[row, span] = number
                predicting = [end_of_context - 1 - window, *range(cursor - window, cursor + len(continuation) - 1 - window)]
                predictors[index] = (row, predicting[: len(continuation)])
                cursor += len(continuation)
        past = self._prefix_cache(items[0].context[:prefix], len(packed)) if prefix else None
        mask = self._packed_mask(segment, prefix)
        logprobs = self._logprobs(ids.to(self.device), mask.to(self.device), positions.to(self.device), keep, past)
        return self._score(logprobs, predictors, items)

    def _packed_mask(self, segment: torch.Tensor, prefix: int = 0) -> torch.Tensor:
        """Additive [batch, 1, query, prefix + key] mask: causal, no padding, context shared, continuations apart.

        Every query may see the whole reused prefix (the first `prefix` keys).
        """
        width = segment.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        query, key = segment[:, :, None], segment[:, None, :]
        allowed = causal & (key >= 0) & ((key == 0) | (key == query))
        allowed |= torch.eye(width, dtype=torch.bool)  # a pad row attends to itself rather than to nothing
        if prefix:
            allowed = torch.cat([allowed.new_ones(allowed.shape[0], width, prefix), allowed], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.model.dtype).min)
        return mask[:, None, :, :]

    def decoder(self, max_rows: int, prefill_tokens: int, cache_tokens: int | None = None) -> ContinuousDecoder:
        """A continuous-batching run (see decode.py for its limits)."""
        return ContinuousDecoder(self, max_rows, prefill_tokens, cache_tokens)

    def generate(self, items: list[GenerationItem]) -> list[str]:
        """The batch's texts; with continuous batching its rows leave as they stop (batches merged
        into one stream go through `runner.streamed`)."""
        if not self.continuous:
            return self.generate_static(items)
        texts: dict[int, str] = {}
        padded = len(items) * max(item.length for item in items)
        self.decoder(len(items), padded, padded).run(items, texts.__setitem__)
        return [texts[k] for k in range(len(items))]

    @torch.inference_mode()
    def generate_static(self, items: list[GenerationItem]) -> list[str]:
        """One `generate` call: every row decodes until the last one stops."""
        ids, mask, _ = self._left_pad([list(item.context) for item in items])
        width = ids.shape[1]
        stop = _StopOnStrings(self.tokenizer, width, items)
        try:
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(item.max_new_tokens for item in items),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([stop]),
                logits_processor=sampling_processors(items, self.model.generation_config),
                use_cache=True,
            )
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(str(error)) from error
        return [finished_text(self.tokenizer, item, row) for row, item in zip(out[:, width:].tolist(), items, strict=True)]

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
