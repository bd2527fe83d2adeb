"""The linear engine's families for the layer registry (``FAMILIES``).

Each is declared once with ``attnjax.core.registry.family`` and has the
registry signature ``fn(query, key, value, *, causal, q_positions=None,
k_positions=None, segment_ids=None, **options) -> [B, T, N, Hv]``. Option
names: ``docs/naming.md`` (``chunk_size`` is the chunk length of every
linear family).
"""
from __future__ import annotations

from attnjax.core.registry import families_of, family
from attnjax.linear.agent import agent_attention
from attnjax.linear.api import linear_attention
from attnjax.linear.based import based_attention
from attnjax.linear.flow import flow_attention
from attnjax.linear.lightning import lightning_attention


def _no_positions(name, q_positions, k_positions, segment_ids):
  if q_positions is not None or k_positions is not None or segment_ids is not None:
    raise NotImplementedError(
        f"the {name!r} family uses default (bottom-right aligned) positions and a single "
        "segment; q_positions, k_positions and segment_ids are not supported.")


@family("linear", padding="key_mask", options=(
    "decay", "eps", "chunk_size", "initial_state", "return_state", "implementation", "key_mask"))
def linear_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                  segment_ids=None, feature_map="elu+1", normalize: bool = True, **options):
  """Katharopoulos-style linear attention: elu+1 features, normalised, unless options say otherwise."""
  return linear_attention(query, key, value, causal=causal, q_positions=q_positions,
                          k_positions=k_positions, segment_ids=segment_ids,
                          feature_map=feature_map, normalize=normalize, **options)


@family("lightning", padding="key_mask", options=(
    "layer_idx", "num_layers", "initial_state", "return_state", "implementation", "normalize",
    "eps", "key_mask"))
def lightning_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                     segment_ids=None, chunk_size: int = 64, decay=None, **options):
  """``lightning_attention``: ``chunk_size`` is its ``block_size``, ``decay`` its per-head
  ``slopes`` [N] (None: TNL's slopes for ``layer_idx`` of ``num_layers``)."""
  _no_positions("lightning", q_positions, k_positions, segment_ids)
  return lightning_attention(query, key, value, causal=causal, block_size=chunk_size,
                             slopes=decay, **options)


@family("based", padding="key_mask")
def based_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                 segment_ids=None, key_mask=None, window=None, left=None, right=None,
                 feature_map="taylor", eps: float = 1e-12, chunk_size: int = 64,
                 branch: str = "sum", scale=None, implementation=None):
  """``based_attention`` (same options, ``key_mask`` [B, S] included).

  The window branch's sides are ``left``/``right`` (keys before / after the
  query) or BASED's ``window`` (an int w: (w, 0) causal, (w, w) otherwise; or
  a pair (left, right)); not both.
  """
  _no_positions("based", q_positions, k_positions, segment_ids)
  if left is not None or right is not None:
    if window is not None:
      raise ValueError(f"the based family takes the window as window={window!r} or as "
                       f"left={left!r}/right={right!r}, not both.")
    window = (64 if left is None else left, 0 if right is None else right)
  return based_attention(query, key, value, causal=causal, window=window,
                         feature_map=feature_map, eps=eps, chunk_size=chunk_size, branch=branch,
                         scale=scale, implementation=implementation, key_mask=key_mask)


@family("flow", options=("eps", "feature_map", "clip_outgoing", "chunk_size", "implementation"),
        padding="causal_prefix", no_padding=(
            "non-causal flow attention normalises over every token: the incoming and outgoing "
            "flows sum phi(k_j) over all S keys and phi(q_i) over all T queries, the "
            "competition is a softmax over the S keys scaled by S and the allocation is scaled "
            "by T/S, so a padded token changes the output of every real one, and the flow "
            "function takes no mask. Causal flow attention (prefix sums only) takes right "
            "padding."))
def flow_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                segment_ids=None, **options):
  """``flow_attention`` (Flowformer); options are its keyword arguments."""
  _no_positions("flow", q_positions, k_positions, segment_ids)
  return flow_attention(query, key, value, causal=causal, **options)


@family("agent", options=("agents", "num_agents", "hw", "bias_ak", "bias_qa", "scale"),
        no_padding=(
            "agent attention pools its agent tokens from the queries over fixed bins of the "
            "padded length T (adaptive average pooling), so padded positions enter every agent "
            "and the bins differ from those of the unpadded sequence: every output mixes all "
            "positions by construction, and the agent function takes no mask."))
def agent_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                 segment_ids=None, **options):
  """``agent_attention`` (Agent Attention); options are its keyword arguments."""
  _no_positions("agent", q_positions, k_positions, segment_ids)
  return agent_attention(query, key, value, causal=causal, **options)


FAMILIES = families_of(__name__)
