"""The emulated devices' memory count: StorageAccounts, moved in bulk by a restore."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zerogpu.cuda.registry import Registry, StorageAccounts

# Storages of a few sizes, the empty one among them.
STORAGES = [torch.UntypedStorage(size) for size in (0, 16, 16, 64, 256)]


@settings(max_examples=200, deadline=None)
@given(
    before=st.dictionaries(st.integers(0, 7), st.tuples(st.integers(0, 4), st.integers(0, 1))),
    moves=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 4), st.integers(0, 1)), max_size=12),
)
def test_a_bulk_move_counts_what_forgetting_and_adding_each_holder_counts(before, moves):
    """Holders that share storages, move onto others, or come new: each storage counted once."""
    bulk, one_by_one = StorageAccounts(), StorageAccounts()
    for accounts in (bulk, one_by_one):
        for holder, (storage, index) in before.items():
            accounts.count(holder, STORAGES[storage], index)
    peaks = dict(bulk.peak)

    bulk.move([(holder, STORAGES[storage], index) for holder, storage, index in moves])
    for holder, storage, index in moves:
        one_by_one.forget(holder)
        one_by_one.count(holder, STORAGES[storage], index)

    assert bulk._holders == one_by_one._holders
    assert bulk._storages == one_by_one._storages
    assert {i: n for i, n in bulk.allocated.items() if n} == {i: n for i, n in one_by_one.allocated.items() if n}
    # The peak is the count's after the move, not one met half-way through it.
    for index in {index for _, _, index in moves}:
        assert bulk.peak[index] == max(peaks.get(index, 0), bulk.allocated.get(index, 0))


def test_a_move_counts_a_storage_shared_by_several_holders_once():
    accounts = StorageAccounts()
    old, new = torch.UntypedStorage(100), torch.UntypedStorage(100)
    accounts.count(1, old, 0)
    accounts.count(2, old, 0)
    accounts.move([(1, new, 0), (2, new, 0)])
    assert accounts.allocated[0] == 100 and accounts.peak[0] == 100
    assert accounts._holders == {1: (new.data_ptr(), 0), 2: (new.data_ptr(), 0)}


def test_a_recount_that_marks_a_tensor_beside_a_moved_one_counts_their_storage_once():
    registry = Registry(StorageAccounts())
    moved, joined = torch.empty(250), torch.empty(0)
    registry.set(moved, 0)
    new = torch.UntypedStorage(1000)
    moved.set_(new)
    joined.set_(new)  # not marked yet: the recount marks it, on the storage the other moved to
    registry.recount([(moved, new), (joined, new)], 0)
    assert registry.memory.allocated[0] == 1000 and registry.memory.peak[0] == 1000
