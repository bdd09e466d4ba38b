from hypothesis import given
from hypothesis import strategies as st

from evalfleet.runtime.backends.base import GenerationItem, LoglikelihoodItem
from evalfleet.runtime.batching import make_batches


def _items(lengths):
    return [LoglikelihoodItem(tuple(range(n)), (1,)) for n in lengths]


@given(st.lists(st.integers(1, 300), min_size=1, max_size=80), st.integers(8, 2000), st.one_of(st.none(), st.integers(1, 9)))
def test_batches_cover_every_item_once_within_budget(lengths, budget, max_size):
    items = _items(lengths)
    batches = make_batches(items, budget, max_size)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(items)))
    for batch in batches:
        assert batch
        if max_size is not None:
            assert len(batch) <= max_size
        width = max(items[i].length for i in batch)
        # A batch over budget is only allowed when it holds a single item longer than the budget.
        assert width * len(batch) <= budget or len(batch) == 1


def test_batches_are_sorted_longest_first():
    items = _items([5, 50, 20, 49, 6])
    batches = make_batches(items, token_budget=102)
    assert [items[i].length for i in batches[0]] == [51, 50]
    assert [i for b in batches for i in b] == [1, 3, 2, 4, 0]


def test_generation_length_counts_new_tokens():
    item = GenerationItem((1, 2, 3), ("\n",), 10)
    assert item.length == 13
    assert make_batches([item, item], token_budget=20) == [[0], [1]]
