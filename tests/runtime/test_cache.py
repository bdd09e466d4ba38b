import threading

from evalfleet.runtime.backends.base import GenerationItem, LoglikelihoodItem
from evalfleet.runtime.cache import RequestCache, model_identity, request_key, weights_fingerprint


def test_key_depends_on_request_and_model_but_not_on_who_computes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    identity = model_identity(str(tmp_path), None, "float32")
    item = LoglikelihoodItem((1, 2), (3,))
    assert request_key(identity, item) == request_key(identity, LoglikelihoodItem((1, 2), (3,)))
    assert request_key(identity, item) != request_key(identity, LoglikelihoodItem((1,), (2, 3)))
    assert request_key(identity, item) != request_key(model_identity(str(tmp_path), None, "bfloat16"), item)
    generation = GenerationItem((1, 2), ("\n",), 4)
    assert request_key(identity, generation) != request_key(identity, GenerationItem((1, 2), ("\n",), 5))
    assert "rank" not in identity and "world" not in identity


def test_fingerprint_changes_with_weights(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 100)
    before = weights_fingerprint(str(tmp_path))
    weights.write_bytes(b"y" * 100)
    assert weights_fingerprint(str(tmp_path)) != before


def test_round_trip_survives_reopen_and_counts(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = RequestCache(path)
    cache.put_many({"a": [-1.25, True], "b": "text"})
    cache.close()
    reopened = RequestCache(path)
    found = reopened.get_many(["a", "b", "c"])
    assert found == {"a": [-1.25, True], "b": "text"}
    assert (reopened.stats.hits, reopened.stats.misses) == (2, 1)
    assert len(reopened) == 2


def test_concurrent_writers(tmp_path):
    cache = RequestCache(tmp_path / "c.sqlite")

    def write(offset):
        for i in range(50):
            cache.put_many({f"{offset}-{i}": i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 200
