"""Parameter-free linear-engine families for the layer registry (FAMILIES).

Each entry is fn(query, key, value, *, causal, q_positions=None,
k_positions=None, segment_ids=None, **options) -> [B, T, N, Hv].
"""
from __future__ import annotations

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


def linear_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                  segment_ids=None, **options):
  """Katharopoulos-style linear attention: elu+1 features, normalised, unless options say otherwise."""
  options.setdefault("feature_map", "elu+1")
  options.setdefault("normalize", True)
  return linear_attention(query, key, value, causal=causal, q_positions=q_positions,
                          k_positions=k_positions, segment_ids=segment_ids, **options)


def _wrap(name, fn):
  def family(query, key, value, *, causal, q_positions=None, k_positions=None,
             segment_ids=None, **options):
    _no_positions(name, q_positions, k_positions, segment_ids)
    return fn(query, key, value, causal=causal, **options)
  family.__name__ = f"{name}_family"
  family.__doc__ = f"Registry entry for {fn.__name__} (options are its keyword arguments)."
  return family


def based_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                 segment_ids=None, key_mask=None, window=None, feature_map="taylor",
                 eps: float = 1e-12, chunk_size: int = 64, branch: str = "sum", scale=None,
                 implementation=None):
  """Registry entry for based_attention (same options, ``key_mask`` [B, S] included)."""
  _no_positions("based", q_positions, k_positions, segment_ids)
  return based_attention(query, key, value, causal=causal, window=window,
                         feature_map=feature_map, eps=eps, chunk_size=chunk_size, branch=branch,
                         scale=scale, implementation=implementation, key_mask=key_mask)


FAMILIES = {
    "linear": linear_family,
    "lightning": _wrap("lightning", lightning_attention),
    "based": based_family,
    "flow": _wrap("flow", flow_attention),
    "agent": _wrap("agent", agent_attention),
}

# How MultiHeadAttention hands these families a padded batch (attnjax.layers.padding).
for _name in ("linear", "lightning", "based"):
  FAMILIES[_name].key_padding = "key_mask"
FAMILIES["flow"].key_padding = "causal_prefix"
FAMILIES["flow"].no_key_padding = (
    "non-causal flow attention normalises over every token: the incoming and outgoing flows "
    "sum phi(k_j) over all S keys and phi(q_i) over all T queries, the competition is a "
    "softmax over the S keys scaled by S and the allocation is scaled by T/S, so a padded "
    "token changes the output of every real one, and the flow function takes no mask. "
    "Causal flow attention (prefix sums only) takes right padding.")
FAMILIES["agent"].no_key_padding = (
    "agent attention pools its agent tokens from the queries over fixed bins of the padded "
    "length T (adaptive average pooling), so padded positions enter every agent and the "
    "bins differ from those of the unpadded sequence: every output mixes all positions by "
    "construction, and the agent function takes no mask.")
