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


FAMILIES = {
    "linear": linear_family,
    "lightning": _wrap("lightning", lightning_attention),
    "based": _wrap("based", based_attention),
    "flow": _wrap("flow", flow_attention),
    "agent": _wrap("agent", agent_attention),
}
