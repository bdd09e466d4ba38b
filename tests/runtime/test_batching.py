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


def test_items_sharing_a_context_stay_in_one_row():
    context = tuple(range(30))
    items = [LoglikelihoodItem(context, (1, 2)), LoglikelihoodItem((9,) * 20, (1,)), LoglikelihoodItem(context, (3,)),
             LoglikelihoodItem(context, (4, 5, 6))]
    batches = make_batches(items, token_budget=40, share_prefixes=True)
    # The three items of `context` pack into one row of 30 + 2 + 1 + 3 = 36 tokens.
    assert batches == [[0, 2, 3], [1]]
    assert make_batches(items, token_budget=40) == [[3], [0], [2], [1]]


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=60), st.integers(20, 400),
       st.one_of(st.none(), st.integers(1, 9)))
def test_packed_batches_cover_every_item_once(spec, budget, max_size):
    items = [LoglikelihoodItem(tuple(range(10 * c + 1)), tuple(range(n))) for c, n in spec]
    batches = make_batches(items, budget, max_size, share_prefixes=True)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    if max_size is not None:
        assert all(len(b) <= max_size for b in batches)


def test_questions_sharing_a_prefix_are_batched_together_and_pay_for_it_once():
    few_shot_a, few_shot_b = tuple(range(100, 140)), tuple(range(200, 240))
    items = []
    for question in range(6):
        prefix = few_shot_a if question % 2 else few_shot_b
        items += [LoglikelihoodItem(prefix + (question, question), (choice,)) for choice in (1, 2)]
    items.append(LoglikelihoodItem((7,) * 30, (1,)))
    # Each row is 40 + 2 + 2 = 44 tokens, 4 past the shared prefix: 3 rows cost 40 + 3 * 4 = 52.
    batches = make_batches(items, token_budget=60, share_prefixes=True, reuse_prefixes=True)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    for batch in batches[:-1]:
        assert len({items[i].context[:40] for i in batch}) == 1 and len(batch) == 6
    assert batches[-1] == [12]
    # Without reuse the same budget holds one question per batch.
    assert all(len(b) <= 2 for b in make_batches(items, token_budget=60, share_prefixes=True))
