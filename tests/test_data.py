"""functrain.data.Loader: the batch at a position is a pure function of the position."""

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

from functrain.data import Loader


def _dataset(n=23):
    return TensorDataset(torch.arange(n))


def _samples(loader, epoch=0, index=0, count=None, stop_epoch=None):
    out = []
    for (x,), e, i in loader.iterate(epoch, index, stop_epoch=stop_epoch):
        out.append((x.tolist(), e, i))
        if count is not None and len(out) == count:
            break
    return out


def test_epoch_is_a_permutation_and_epochs_differ():
    loader = Loader(_dataset(24), batch_size=4, seed=3)
    e0 = [v for b, _, _ in _samples(loader, 0, 0, stop_epoch=1) for v in b]
    e1 = [v for b, _, _ in _samples(loader, 1, 0, stop_epoch=2) for v in b]
    assert sorted(e0) == list(range(24)) and sorted(e1) == list(range(24))
    assert e0 != e1 and e0 != list(range(24))


def test_same_seed_same_batches_other_seed_other_batches():
    a = _samples(Loader(_dataset(), batch_size=4, seed=1), count=10)
    b = _samples(Loader(_dataset(), batch_size=4, seed=1), count=10)
    c = _samples(Loader(_dataset(), batch_size=4, seed=2), count=10)
    assert a == b and a != c


def test_positions_cross_epochs_and_drop_last():
    loader = Loader(_dataset(23), batch_size=5, seed=0)  # 4 batches, 3 samples dropped
    assert loader.steps_per_epoch == len(loader) == 4
    got = _samples(loader, count=6)
    assert [(e, i) for _, e, i in got] == [(0, 5), (0, 10), (0, 15), (1, 0), (1, 5), (1, 10)]
    assert all(len(b) == 5 for b, _, _ in got)


def test_resume_from_any_position_continues_without_replay():
    loader = Loader(_dataset(), batch_size=4, seed=7)
    full = _samples(loader, count=12)
    for k in range(1, 11):
        _, e, i = full[k - 1]
        assert _samples(Loader(_dataset(), batch_size=4, seed=7), e, i, count=12 - k) == full[k:]


def test_not_drop_last_yields_the_remainder():
    loader = Loader(_dataset(10), batch_size=4, shuffle=False, drop_last=False)
    got = _samples(loader, stop_epoch=1)
    assert [b for b, _, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert got[-1][1:] == (1, 0)


def test_ranks_partition_each_global_batch():
    n, b, w = 24, 3, 2
    ranks = [_samples(Loader(_dataset(n), batch_size=b, seed=5, rank=r, world_size=w), stop_epoch=1) for r in range(w)]
    single = _samples(Loader(_dataset(n), batch_size=b * w, seed=5), stop_epoch=1)
    for one, *shards in zip(single, *ranks):
        assert sum((s[0] for s in shards), []) == one[0]
        assert all(s[1:] == one[1:] for s in shards)  # every rank agrees on the position


def test_resume_on_another_world_size_sees_the_remaining_samples():
    n = 24
    two = Loader(_dataset(n), batch_size=2, seed=9, rank=0, world_size=2)
    _, e, i = _samples(two, count=2)[-1]  # 8 samples consumed by both ranks
    rest = [v for b, _, _ in _samples(Loader(_dataset(n), batch_size=4, seed=9), e, i, stop_epoch=1) for v in b]
    assert rest == Loader(_dataset(n), batch_size=4, seed=9).permutation(0)[8:].tolist()


def test_not_drop_last_pads_across_ranks():
    loaders = [Loader(_dataset(5), 2, shuffle=False, drop_last=False, rank=r, world_size=2) for r in (0, 1)]
    shards = [_samples(loader, count=3) for loader in loaders]
    assert [s[0] for s in shards[0]][:2] == [[0, 1], [4]]
    assert [s[0] for s in shards[1]][:2] == [[2, 3], [0]]


def test_workers_give_the_same_batches():
    base = _samples(Loader(_dataset(), batch_size=4, seed=1), 0, 8, count=7)
    assert _samples(Loader(_dataset(), batch_size=4, seed=1, num_workers=2), 0, 8, count=7) == base


def test_collate_fn_is_used():
    loader = Loader(list(range(8)), batch_size=4, shuffle=False, collate_fn=lambda xs: sum(xs))
    assert list(loader) == [6, 22]


def test_global_rng_is_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _samples(Loader(_dataset(), batch_size=4, seed=1), count=8)
    assert torch.equal(torch.rand(3), expected)


def test_iterable_dataset_is_refused_with_a_fix():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(TypeError, match="map-style"):
        Loader(Stream(), batch_size=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Loader(_dataset(3), batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        Loader(_dataset(), batch_size=2, rank=2, world_size=2)


def test_fingerprint_ignores_world_size_but_not_global_batch():
    a = Loader(_dataset(24), batch_size=4, world_size=2, rank=1).fingerprint()
    assert a == Loader(_dataset(24), batch_size=8).fingerprint()
    assert a != Loader(_dataset(24), batch_size=4).fingerprint()


@pytest.mark.parametrize("n,world", [(10, 3), (13, 2), (2, 4)])
def test_shards_of_all_ranks_partition_the_dataset_in_order(n, world):
    data = torch.utils.data.TensorDataset(torch.arange(n))
    seen = []
    for rank in range(world):
        loader = Loader(data, batch_size=3, shuffle=True, drop_last=False, rank=rank, world_size=world)
        mine = [int(i) for (b,) in loader.shard() for i in b]
        assert all(len(b) <= 3 for (b,) in loader.shard())
        seen += mine
    assert seen == list(range(n))  # each sample once, in dataset order, shares contiguous
