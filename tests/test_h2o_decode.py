"""H2O's greedy eviction cache (attnjax.decoding.h2o_decode_step / h2o_prefill) against an
explicit Python reference of the algorithm, and against dense decoding when nothing is evicted."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import decoding as D
from attnjax import reference_attention
from attnjax.masks import Causal


def _rand(shape, seed):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape), np.float32)


def _reference(q, k, v, *, heavy, recent, prompt):
  """Dict-based H2O over one sequence: prefill ``prompt`` tokens, then one token per step.

  q [T, N, H], k/v [T, K, H] (float64). Returns outputs [T - prompt, N, H] of the steps.
  """
  T, N, H = q.shape
  K = k.shape[1]
  g = N // K
  kept, outs = [], []
  for h in range(K):
    # prompt: full causal attention, scores summed over the group's queries and the prompt
    s = np.einsum("tgh,sh->gts", q[:prompt, h * g:(h + 1) * g], k[:prompt, h]) / np.sqrt(H)
    s = np.where(np.arange(prompt)[None, :] <= np.arange(prompt)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    acc = p.sum((0, 1))
    rec = list(range(max(0, prompt - recent), prompt))
    early = [j for j in range(prompt) if j not in rec]
    heavy_j = sorted(early, key=lambda j: -acc[j])[:heavy]
    kept.append({j: acc[j] for j in heavy_j + rec})
  for t in range(prompt, T):
    out = np.zeros((N, H))
    for h in range(K):
      cand = dict(kept[h])
      cand[t] = 0.0
      rec = sorted(cand)[-recent:]
      others = sorted((j for j in cand if j not in rec), key=lambda j: -cand[j])[:heavy]
      keep = sorted(others + rec)
      qs = q[t, h * g:(h + 1) * g]
      s = qs @ k[keep, h].T / np.sqrt(H)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[h * g:(h + 1) * g] = p @ v[keep, h]
      kept[h] = {j: cand[j] + p[:, i].sum() for i, j in enumerate(keep)}
    outs.append(out)
  return np.stack(outs)


def _run(q, k, v, *, heavy, recent, prompt):
  """Prefill with h2o_prefill then h2o_decode_step per token, in one jitted scan."""
  B, T = q.shape[:2]
  K = k.shape[2]

  def f(q, k, v):
    _, probs = reference_attention(q[:, :prompt], k[:, :prompt], v[:, :prompt], mask=Causal(),
                                   return_probs=True)
    acc = D.h2o_accumulate(jnp.zeros((B, K, prompt)), probs)
    cache = D.h2o_prefill(k[:, :prompt], v[:, :prompt], acc, heavy=heavy, recent=recent)

    def step(c, t):
      sl = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
      out, c = D.h2o_decode_step(sl(q), sl(k), sl(v), c, jnp.full((B,), t), heavy=heavy,
                                 recent=recent)
      return c, out[:, 0]
    cache, outs = jax.lax.scan(step, cache, jnp.arange(prompt, T))
    return jnp.swapaxes(outs, 0, 1), cache
  return jax.jit(f)(q, k, v)


@pytest.mark.parametrize("heavy,recent,prompt", [(3, 2, 9), (2, 3, 4), (0, 4, 6)])
def test_h2o_decode_matches_the_greedy_eviction_reference(heavy, recent, prompt):
  B, T, N, K, H = 2, 16, 4, 2, 8
  q, k, v = _rand((B, T, N, H), 1), _rand((B, T, K, H), 2), _rand((B, T, K, H), 3)
  outs, cache = _run(q, k, v, heavy=heavy, recent=recent, prompt=prompt)
  for b in range(B):
    want = _reference(q[b].astype(np.float64), k[b].astype(np.float64), v[b].astype(np.float64),
                      heavy=heavy, recent=recent, prompt=prompt)
    np.testing.assert_allclose(np.asarray(outs[b]), want, atol=2e-5)
  pos = np.asarray(cache.positions)
  assert pos.shape == (B, K, heavy + recent)
  assert (pos >= 0).all() and all(len(set(r)) == len(r) for r in pos.reshape(-1, pos.shape[-1]))
  assert (np.sort(pos, -1)[..., -recent:] == np.arange(T - recent, T)).all()


def test_h2o_decode_with_room_for_everything_is_dense_decoding():
  B, T, N, K, H = 1, 10, 6, 2, 8
  q, k, v = _rand((B, T, N, H), 4), _rand((B, T, K, H), 5), _rand((B, T, K, H), 6)
  outs, cache = _run(q, k, v, heavy=8, recent=4, prompt=3)
  dense = reference_attention(q, k, v, mask=Causal())[:, 3:]
  np.testing.assert_allclose(np.asarray(outs), np.asarray(dense), atol=1e-5)
  # empty slots stay empty (-1) until tokens arrive: 12 slots, 10 tokens
  assert sorted(np.asarray(cache.positions)[0, 0].tolist()) == [-1, -1] + list(range(10))


def test_h2o_cache_bad_input_names_the_argument():
  c = D.empty_h2o_cache(1, 2, 8, heavy=2, recent=2)
  q, kv = jnp.zeros((1, 1, 4, 8)), jnp.zeros((1, 1, 2, 8))
  with pytest.raises(ValueError, match="recent"):
    D.empty_h2o_cache(1, 2, 8, heavy=2, recent=0)
  with pytest.raises(ValueError, match="heavy"):
    D.h2o_decode_step(q, kv, kv, c, 0, heavy=-1, recent=2)
  with pytest.raises(ValueError, match="one token"):
    D.h2o_decode_step(jnp.zeros((1, 2, 4, 8)), kv, kv, c, 0, heavy=2, recent=2)
  with pytest.raises(ValueError, match="slots"):
    D.h2o_decode_step(q, kv, kv, c, 0, heavy=3, recent=2)
  with pytest.raises(ValueError, match="acc"):
    D.h2o_prefill(jnp.zeros((1, 5, 2, 8)), jnp.zeros((1, 5, 2, 8)), jnp.zeros((1, 2, 4)),
                  heavy=2, recent=2)
