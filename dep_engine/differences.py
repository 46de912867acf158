"""Difference embeddings of the method: how the user's review of an item differs from its peers' reviews.

    e_diff_i = sum_r w_r (e_u,i - e_r,i)   over the peers r of item i
    w        = softmax_r( (||m_u - m_r|| / sum_r' ||m_u - m_r'||) / T )

m_x is the mean embedding of user x's reviews, T the temperature (T = 1 is the paper's formula).
All items and their peers are processed at once: peers are concatenated, item by item, and
`offsets[i]` says where item i's peers start.
"""
from __future__ import annotations

import numpy as np


def _segment_softmax(scores: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    peak = np.maximum.reduceat(scores, offsets)
    counts = np.diff(np.append(offsets, len(scores)))
    exp = np.exp(scores - np.repeat(peak, counts))
    return exp / np.repeat(np.add.reduceat(exp, offsets), counts)


def peer_weights(user_mean: np.ndarray, peer_means: np.ndarray, offsets: np.ndarray,
                 temperature: float = 1.0) -> np.ndarray:
    """w_r for every peer, each item's weights summing to one."""
    if temperature <= 0:
        raise ValueError(f"peer temperature must be positive, got {temperature}")
    counts = np.diff(np.append(offsets, len(peer_means)))
    distance = np.linalg.norm(peer_means - user_mean[None, :], axis=1)
    total = np.repeat(np.add.reduceat(distance, offsets), counts)
    share = np.divide(distance, total, out=np.zeros_like(distance), where=total > 0)
    return _segment_softmax(share / temperature, offsets)


def difference_embeddings(user_embeddings: np.ndarray, user_mean: np.ndarray, peer_embeddings: np.ndarray,
                          peer_means: np.ndarray, offsets: np.ndarray,
                          temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(K, d) difference embeddings and the (P,) peer weights.

    user_embeddings: (K, d) e_u,i; peer_embeddings, peer_means: (P, d); offsets: (K,) start of each
    item's peers, increasing, every item with at least one peer."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) != len(user_embeddings):
        raise ValueError("one offset per selected item is needed")
    if len(offsets) == 0:
        return np.zeros_like(user_embeddings), np.zeros(0, dtype=user_embeddings.dtype)
    counts = np.diff(np.append(offsets, len(peer_embeddings)))
    if (counts <= 0).any():
        raise ValueError("every item needs at least one peer")
    weights = peer_weights(user_mean, peer_means, offsets, temperature)
    weighted_peers = np.add.reduceat(peer_embeddings * weights[:, None], offsets, axis=0)
    # sum_r w_r (e_u - e_r) = e_u - sum_r w_r e_r, since each item's weights sum to one
    return (user_embeddings - weighted_peers).astype(user_embeddings.dtype), weights.astype(user_embeddings.dtype)


def difference_embeddings_loop(user_embeddings, user_mean, peers_per_item, peer_means_per_item,
                               temperature: float = 1.0) -> np.ndarray:
    """The formula written peer by peer, as the reference code does; kept to check the fast version."""
    result = []
    for e_u, peers, means in zip(user_embeddings, peers_per_item, peer_means_per_item):
        distances = [float(np.linalg.norm(user_mean - m)) for m in means]
        total = sum(distances)
        scores = [(d / total if total > 0 else 0.0) / temperature for d in distances]
        top = max(scores)
        exps = [np.exp(s - top) for s in scores]
        diff = np.zeros_like(e_u, dtype=np.float64)
        for e_r, e in zip(peers, exps):
            diff += (e / sum(exps)) * (e_u - e_r)
        result.append(diff)
    return np.array(result)
