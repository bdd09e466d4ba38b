"""The bundled demo tasks and demo model: loadable anywhere, honest splits, a trained model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import evalfleet

PACKAGE = Path(evalfleet.__file__).resolve().parent
TASK_DIR = PACKAGE / "tasks" / "demo"
MODEL_DIR = PACKAGE / "assets" / "demo-model"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TASKS = {"demo_mc": "multiple_choice", "demo_arith": "generate_until", "demo_ppl": "loglikelihood_rolling"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data_script():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPTS / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def splits(data_script):
    return data_script.build_splits(data_script.SEED)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True, dtype=torch.float32).eval()


def test_tasks_load_from_another_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    assert set(TASKS) <= set(manager.all_tasks)
    loaded = manager.load(list(TASKS))["tasks"]
    for name, output_type in TASKS.items():
        task = loaded[name]
        docs = list(task.test_docs())
        assert task.OUTPUT_TYPE == output_type
        assert docs == read_jsonl(TASK_DIR / f"{name}.jsonl")
    arith = loaded["demo_arith"]
    assert arith.config.generation_kwargs["until"] == ["\n"]
    assert arith.config.generation_kwargs["max_gen_toks"] == 8


def test_shipped_test_splits_are_what_the_script_generates(splits):
    for name in TASKS:
        assert read_jsonl(TASK_DIR / f"{name}.jsonl") == splits[name]["test"]


def test_train_and_test_splits_are_disjoint(splits):
    keys = {"demo_mc": "query", "demo_arith": "question", "demo_ppl": "text"}
    for name, key in keys.items():
        train = {doc[key] for doc in splits[name]["train"]}
        test = [doc[key] for doc in splits[name]["test"]]
        assert len(set(test)) == len(test)
        assert train and not train & set(test), name


def test_data_script_is_deterministic_per_seed(data_script, splits):
    assert data_script.build_splits(data_script.SEED) == splits
    assert data_script.build_splits(data_script.SEED + 1)["demo_arith"]["test"] != splits["demo_arith"]["test"]


def test_mc_choices_are_multi_token_and_fair(tokenizer):
    for doc in read_jsonl(TASK_DIR / "demo_mc.jsonl"):
        choices = doc["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert 0 <= doc["label"] < 4
        for choice in choices:
            assert len(tokenizer.encode(" " + choice)) >= 2, choice
            others = [c for c in choices if c != choice]
            assert not any((other + " ").startswith(choice + " ") for other in others), choices


def test_some_perplexity_documents_need_several_windows(model, tokenizer):
    lengths = [len(tokenizer.encode(doc["text"])) for doc in read_jsonl(TASK_DIR / "demo_ppl.jsonl")]
    window = model.config.max_position_embeddings
    assert any(n > window for n in lengths)
    assert min(lengths) * 10 < max(lengths)


def test_model_is_small_and_loads_offline(model, tokenizer):
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20
    assert (MODEL_DIR / "model.safetensors").is_file()
    config = model.config
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.vocab_size % 64 == 0 and len(tokenizer) <= config.vocab_size


def test_tokenizer_adds_no_special_tokens(tokenizer):
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    encoded = tokenizer.encode("12+34=")
    assert tokenizer.bos_token_id not in encoded
    assert tokenizer.decode(encoded) == "12+34="
    assert len(encoded) == 6  # digits are single tokens


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer.encode(context)
    ids = tokenizer.encode(context + continuation)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_model_is_trained_on_the_tasks(model, tokenizer):
    mc = read_jsonl(TASK_DIR / "demo_mc.jsonl")[:24]
    correct = 0
    for doc in mc:
        scores = [_continuation_logprob(model, tokenizer, doc["query"], " " + c) for c in doc["choices"]]
        correct += scores.index(max(scores)) == doc["label"]
    assert correct / len(mc) > 0.6  # chance is 0.25

    arith = read_jsonl(TASK_DIR / "demo_arith.jsonl")[::20]
    solved = 0
    for doc in arith:
        prompt = torch.tensor([tokenizer.encode(doc["question"])])
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        solved += tokenizer.decode(out[0, prompt.shape[1]:]).split("\n")[0] == doc["answer"]
    assert solved / len(arith) > 0.5
