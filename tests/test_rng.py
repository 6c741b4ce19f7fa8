import torch

from functrain.core import rng


def test_seeded_is_reproducible_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    k = rng.key(3)
    with rng.seeded(k):
        a = torch.rand(5)
    with rng.seeded(k):
        b = torch.rand(5)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)


def test_distinct_keys_and_ranks_give_distinct_streams():
    k = rng.key(0)
    seeds = {rng.seed_of(k), rng.seed_of(rng.next_key(k)), rng.seed_of(k, rank=1), rng.seed_of(rng.key(1))}
    seeds |= {rng.seed_of(s) for s in rng.split(k, 4)}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_next_key_is_a_tensor_op_and_fold_in_is_deterministic():
    k = rng.key(7)
    assert rng.next_key(k).tolist() == [k[0].item(), 1]
    assert torch.equal(rng.fold_in(k, 5), rng.fold_in(k.clone(), 5))
    assert not torch.equal(rng.fold_in(k, 5), rng.fold_in(k, 6))


def test_bad_key_is_refused_with_a_hint():
    import pytest

    with pytest.raises(TypeError, match="functrain.random.key"):
        rng.seed_of(torch.zeros(3))


def test_seeded_seeds_only_the_forked_generator_and_restores_it_on_error(monkeypatch):
    # torch.manual_seed also visits every accelerator backend (CUDA, XPU, MTIA...: ~150 us
    # a call, paid by every train step); seeded must not go through it.
    import pytest

    def forbidden(seed):
        raise AssertionError("seeded must not call torch.manual_seed")

    monkeypatch.setattr(torch, "manual_seed", forbidden)
    k = rng.key(11)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(rng.seed_of(k, rank=2)))
    before = torch.get_rng_state()
    with rng.seeded(k, rank=2, device="cpu"):
        assert torch.equal(torch.rand(4), expected)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ValueError, match="boom"):
        with rng.seeded(k):
            torch.rand(3)
            raise ValueError("boom")
    assert torch.equal(torch.get_rng_state(), before)
