"""Model profiles: published parameter counts, formulas against meta-device builds, and bad input."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import struct
from pathlib import Path

import pytest

from evalfleet.planning import PlanningError, estimate_weights_gb, profile_model, shipped_models
from evalfleet.planning import model_profile as mp
from evalfleet.types import UsageError

# Counts published on the model cards / papers (exact where the card gives the exact number).
PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-405B": 405_853_388_800,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen/Qwen2-72B": 72_710_000_000,
    "tiiuae/falcon-40b": 41_800_000_000,
    "tiiuae/falcon-180B": 179_500_000_000,
    "EleutherAI/gpt-neox-20b": 20_554_567_680,
    "facebook/opt-30b": 30_000_000_000,
    "facebook/opt-66b": 66_000_000_000,
    "facebook/opt-175b": 175_000_000_000,
    "bigscience/bloom": 176_247_271_424,
    "gpt2": 124_439_808,
}


@pytest.mark.parametrize("model_id", sorted(PUBLISHED))
def test_shipped_config_matches_published_count(model_id):
    profile = profile_model(model_id)
    assert profile.count_method == "analytic"
    assert abs(profile.params - PUBLISHED[model_id]) / PUBLISHED[model_id] < 0.005


def test_every_shipped_config_has_a_published_count():
    assert {path.name for path in shipped_models().values()} == {
        path.name for model_id, path in shipped_models().items() if model_id in PUBLISHED
    }


def test_exact_counts_where_the_card_gives_them():
    assert profile_model("meta-llama/Llama-2-7b-hf").params == 6_738_415_616
    assert profile_model("meta-llama/Llama-3.1-405B").params == 405_853_388_800
    assert profile_model("bigscience/bloom").params == 176_247_271_424


@pytest.mark.parametrize("model_id", ["meta-llama/Llama-2-70b-hf", "mistralai/Mixtral-8x7B-v0.1", "tiiuae/falcon-40b"])
def test_meta_device_build_agrees_with_the_formula_on_shipped_configs(model_id):
    exact = profile_model(model_id, exact=True)
    analytic = profile_model(model_id)
    assert exact.count_method == "meta"
    assert exact.params == analytic.params
    assert exact.params_per_layer == analytic.params_per_layer


def _random_config(family: str, rng: random.Random) -> dict:
    """A config no one here wrote: random sizes for the family, in its own spelling."""
    heads = rng.choice([2, 4, 6, 8])
    head_dim = rng.choice([4, 8, 16])
    hidden = heads * head_dim
    layers = rng.randint(1, 4)
    vocab = rng.randint(50, 400)
    tie = rng.random() < 0.5
    kv = rng.choice([d for d in (1, 2, heads) if heads % d == 0])
    if family == "gpt2":
        return {
            "model_type": "gpt2",
            "n_embd": hidden,
            "n_layer": layers,
            "n_head": heads,
            "vocab_size": vocab,
            "n_positions": rng.randint(16, 128),
            "n_inner": rng.choice([None, 3 * hidden]),
            "tie_word_embeddings": tie,
        }
    if family == "gpt_neox":
        return {
            "model_type": "gpt_neox",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": rng.randint(8, 96),
            "vocab_size": vocab,
            "max_position_embeddings": 64,
            "attention_bias": rng.random() < 0.5,
            "tie_word_embeddings": tie,
        }
    if family in ("llama", "mistral", "qwen2"):
        extra = {"attention_bias": rng.random() < 0.5, "mlp_bias": rng.random() < 0.5} if family == "llama" else {}
        return {
            "model_type": family,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "intermediate_size": rng.randint(8, 96),
            "vocab_size": vocab,
            "max_position_embeddings": 64,
            "tie_word_embeddings": tie,
            **extra,
        }
    if family == "mixtral":
        return {
            "model_type": "mixtral",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "intermediate_size": rng.randint(8, 64),
            "vocab_size": vocab,
            "num_local_experts": rng.randint(2, 4),
            "num_experts_per_tok": 2,
            "tie_word_embeddings": tie,
        }
    if family == "falcon":
        new = rng.random() < 0.5
        return {
            "model_type": "falcon",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_kv_heads": kv,
            "new_decoder_architecture": new,
            "multi_query": rng.random() < 0.5,
            "parallel_attn": rng.random() < 0.7,
            "bias": rng.random() < 0.5,
            "vocab_size": vocab,
            "ffn_hidden_size": rng.choice([None, 2 * hidden]),
            "tie_word_embeddings": tie,
        }
    if family == "opt":
        proj = rng.choice([hidden, hidden // 2])
        return {
            "model_type": "opt",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "ffn_dim": rng.randint(8, 96),
            "vocab_size": vocab,
            "max_position_embeddings": 32,
            "word_embed_proj_dim": proj,
            "enable_bias": rng.random() < 0.5,
            "do_layer_norm_before": rng.random() < 0.7,
            "tie_word_embeddings": tie,
        }
    return {
        "model_type": "bloom",
        "hidden_size": hidden,
        "n_layer": layers,
        "n_head": heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
    }


@pytest.mark.parametrize(
    "family", ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "mixtral", "falcon", "opt", "bloom"]
)
def test_formula_equals_meta_build_on_random_configs(family):
    rng = random.Random(f"{family}-42")
    for _ in range(4):
        cfg = _random_config(family, rng)
        analytic = profile_model(cfg)
        exact = profile_model(cfg, exact=True)
        assert exact.count_method == "meta"
        assert analytic.params == exact.params, cfg
        assert analytic.params_per_layer == exact.params_per_layer, cfg


def test_profile_reports_shape_and_bytes():
    profile = profile_model("meta-llama/Llama-2-70b-hf")
    assert (profile.family, profile.num_layers, profile.hidden_size) == ("llama", 80, 8192)
    assert (profile.num_heads, profile.num_kv_heads, profile.head_dim) == (64, 8, 128)
    assert (profile.vocab_size, profile.max_positions, profile.intermediate_size) == (32000, 4096, 28672)
    assert profile.params == profile.embedding_params + 80 * profile.params_per_layer + profile.head_params
    by_dtype = profile.weight_bytes_by_dtype()
    assert by_dtype["float32"] == 4 * profile.params
    assert by_dtype["bfloat16"] == by_dtype["float16"] == 2 * profile.params
    assert by_dtype["int8"] == profile.params
    assert by_dtype["int4"] == profile.params // 2
    # 80 layers x (K and V) x 8 heads x 128 dims x 2 bytes
    assert profile.kv_bytes_per_token("bf16") == 80 * 2 * 8 * 128 * 2
    assert profile.kv_bytes_per_token("float32") == 2 * profile.kv_bytes_per_token("bfloat16")
    assert profile.kv_bytes_per_token("int4") == profile.kv_bytes_per_token("bfloat16")


def test_weights_match_vllm_measurement_for_llama_31_8b():
    # vLLM logs "Loading model weights took 14.99 GiB" for Llama-3.1-8B in bf16.
    assert estimate_weights_gb(profile_model("meta-llama/Llama-3.1-8B"), "bfloat16") == pytest.approx(14.99, rel=0.005)
    assert estimate_weights_gb("meta-llama/Llama-3.1-8B", "float32") == pytest.approx(2 * 14.96, rel=0.005)


def test_flops_count_active_parameters_only():
    mixtral = profile_model("mistralai/Mixtral-8x7B-v0.1")
    # Mixtral's card: 46.7B parameters, 12.9B used per token (that figure includes the embedding table).
    assert mixtral.active_params + mixtral.embedding_params == pytest.approx(12.9e9, rel=0.005)
    dense = profile_model("meta-llama/Llama-2-7b-hf")
    assert dense.flops_per_token() == pytest.approx(2 * (dense.params - 32000 * 4096))
    assert dense.flops_per_token(context=1000) > dense.flops_per_token()


def test_tied_embeddings_are_counted_once_but_multiplied_for_logits():
    gpt2 = profile_model("gpt2")
    assert gpt2.tie_word_embeddings
    assert gpt2.active_params == gpt2.params - gpt2.embedding_params + gpt2.vocab_size * gpt2.hidden_size


def test_short_names_aliases_and_default_dtype():
    assert profile_model("Llama-2-70b-hf").params == profile_model("meta-llama/Llama-2-70b-hf").params
    assert profile_model("llama-2-70b-HF").name == "llama-2-70b-HF"
    assert profile_model("meta-llama/Llama-2-70b-hf") is profile_model("meta-llama/Llama-2-70b-hf")
    assert profile_model("meta-llama/Meta-Llama-3.1-8B-Instruct").params == 8_030_261_248
    assert profile_model("EleutherAI/gpt-neox-20b").default_dtype == "float16"
    assert profile_model("gpt2").weight_bytes("auto") == 124_439_808 * 2


def test_local_folder_and_file(tmp_path):
    cfg = json.loads(shipped_models()["mistralai/Mistral-7B-v0.1"].read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert profile_model(tmp_path).params == 7_241_732_096
    assert profile_model(str(tmp_path / "config.json")).params == 7_241_732_096
    cfg["num_hidden_layers"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.utime(tmp_path / "config.json", ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert profile_model(tmp_path / "config.json").num_layers == 16


def test_architecture_transformers_knows_without_a_formula_uses_meta_build():
    cfg = {
        "model_type": "phi",
        "architectures": ["PhiForCausalLM"],
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 100,
    }
    profile = profile_model(cfg)
    assert profile.count_method == "meta"
    assert profile.family == "phi"
    assert profile.params == profile.embedding_params + 2 * profile.params_per_layer + profile.head_params
    assert profile.params_per_layer > 4 * 32 * 32


def test_unknown_architecture_is_estimated_with_llama_shape():
    cfg = {
        "model_type": "made_up_arch",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "vocab_size": 10,
    }
    profile = profile_model(cfg)
    assert profile.count_method == "estimate"
    assert profile.params == 10 * 64 * 2 + 3 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64) + 64


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.count(". ") == 0 and len(message) < 300


def test_unknown_id_offline_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PlanningError) as info:
        profile_model("someone/not-a-model")
    assert isinstance(info.value, UsageError)
    assert "someone/not-a-model" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    assert _one_sentence(str(info.value))


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(PlanningError, match="cannot be reached"):
        profile_model("someone/other-model")


def test_hub_download_when_reachable(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(mp, "_hub_reachable", lambda timeout=2.0: True)
    import huggingface_hub

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}))
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if repo_id == "org/missing":
            raise FileNotFoundError(repo_id)
        return str(config)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert profile_model("org/tiny-hub-model").num_layers == 2
    assert calls == [("org/tiny-hub-model", "config.json")]
    with pytest.raises(PlanningError, match="did not provide its config.json"):
        profile_model("org/missing")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10}, "num_hidden_layers"),
        ({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10}, "hidden_size"),
        ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 0}, "vocab_size"),
        (
            {
                "model_type": "llama",
                "hidden_size": 66,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 10,
            },
            "divide",
        ),
        ("./no/such/folder", "no such model folder"),
        ("bad id with spaces", "no such model folder"),
    ],
)
def test_bad_configs_fail_in_one_sentence(source, message):
    with pytest.raises(PlanningError) as info:
        profile_model(source)
    assert message in str(info.value)
    assert _one_sentence(str(info.value))


def test_bad_files(tmp_path):
    with pytest.raises(PlanningError, match="has no config.json"):
        profile_model(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PlanningError, match="not valid JSON"):
        profile_model(broken)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(PlanningError, match="not a JSON object"):
        profile_model(listing)


def test_dtype_names():
    assert mp.normalize_dtype("BF16") == "bfloat16"
    assert mp.normalize_dtype("auto", "float16") == "float16"
    with pytest.raises(PlanningError, match="unknown dtype 'fp8'"):
        mp.normalize_dtype("fp8")


def test_profile_to_dict_is_json():
    document = json.loads(json.dumps(profile_model("gpt2").to_dict()))
    assert document["params"] == 124_439_808
    assert document["weight_bytes"]["float32"] == 4 * 124_439_808


def test_demo_checkpoint_holds_exactly_the_counted_parameters():
    """A real checkpoint: the tensor shapes in the demo model's safetensors header sum to the count."""
    folder = Path(mp.__file__).resolve().parent.parent / "assets" / "demo-model"
    with open(folder / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    stored = sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    profile = profile_model("demo")
    assert profile.params == stored
    assert profile.default_dtype == "float32"
