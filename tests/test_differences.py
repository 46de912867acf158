import numpy as np
import pytest

from dep_engine.differences import difference_embeddings, difference_embeddings_loop, peer_weights


def random_case(seed=0, items=5, dim=16):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, size=items)
    user = rng.normal(size=(items, dim)).astype(np.float32)
    user_mean = rng.normal(size=dim).astype(np.float32)
    peers = [rng.normal(size=(c, dim)).astype(np.float32) for c in counts]
    means = [rng.normal(size=(c, dim)).astype(np.float32) for c in counts]
    return user, user_mean, peers, means


@pytest.mark.parametrize("temperature", [1.0, 0.1, 5.0])
def test_vectorised_matches_loop(temperature):
    user, user_mean, peers, means = random_case()
    offsets = np.cumsum([0] + [len(p) for p in peers[:-1]])
    fast, weights = difference_embeddings(user, user_mean, np.concatenate(peers), np.concatenate(means), offsets,
                                          temperature)
    slow = difference_embeddings_loop(user, user_mean, peers, means, temperature)
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    sums = np.add.reduceat(weights, offsets)
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)


def test_weights_favour_distant_peers_more_at_low_temperature():
    user_mean = np.zeros(2)
    means = np.array([[1.0, 0], [3.0, 0]])
    offsets = np.array([0])
    mild = peer_weights(user_mean, means, offsets, 1.0)
    sharp = peer_weights(user_mean, means, offsets, 0.05)
    assert mild[1] > mild[0] and sharp[1] > mild[1]
    np.testing.assert_allclose(mild, np.exp([0.25, 0.75]) / np.exp([0.25, 0.75]).sum())


def test_single_peer_gives_plain_difference():
    user = np.array([[1.0, 2.0]], dtype=np.float32)
    peer = np.array([[0.5, 0.5]], dtype=np.float32)
    diff, weights = difference_embeddings(user, np.zeros(2, np.float32), peer, peer, np.array([0]))
    np.testing.assert_allclose(diff, [[0.5, 1.5]])
    assert weights.tolist() == [1.0]


def test_item_without_peers_is_rejected():
    with pytest.raises(ValueError, match="at least one peer"):
        difference_embeddings(np.zeros((2, 3), np.float32), np.zeros(3), np.zeros((1, 3)), np.zeros((1, 3)),
                              np.array([0, 1]))
