"""Which keyword options an attention family function accepts.

Family functions take ``(query, key, value, *, causal, q_positions,
k_positions, segment_ids, **options)``; many forward ``**options`` to the
function that implements them. :func:`option_names` follows that forwarding
in the functions' source (a few calls deep) so that a misspelt option is
reported by name, with the valid ones, before the family runs.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any, Callable, Dict, List, Optional, Tuple

from attnjax.core.registry import CALL_ARGS

__all__ = ["CALL_ARGS", "option_names"]

_NAMED = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _lookup(expr, scope: Dict[str, Any]) -> Optional[Callable]:
  """The object a call's target expression (a name or attribute chain) refers to."""
  if isinstance(expr, ast.Name):
    return scope.get(expr.id)
  if isinstance(expr, ast.Attribute):
    owner = _lookup(expr.value, scope)
    return None if owner is None else getattr(owner, expr.attr, None)
  return None


def _forwarding_calls(fn, var_kw: str) -> Optional[List[Tuple[Callable, int, List[str]]]]:
  """(callee, positional argument count, explicit keywords) of each call passing ``**var_kw``.

  None when ``fn``'s source or a callee cannot be found.
  """
  try:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    scope = dict(fn.__globals__)
    scope.update(inspect.getclosurevars(fn).nonlocals)
  except (OSError, TypeError, SyntaxError, AttributeError):
    return None
  calls = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call) or not any(
        k.arg is None and isinstance(k.value, ast.Name) and k.value.id == var_kw
        for k in node.keywords):
      continue
    callee = _lookup(node.func, scope)
    if callee is None or not callable(callee):
      return None
    calls.append((callee, len(node.args), [k.arg for k in node.keywords if k.arg]))
  return calls or None


def option_names(fn: Callable, depth: int = 4) -> Tuple[List[str], bool]:
  """The keyword options family function ``fn`` accepts, and whether that list is complete.

  The named keyword parameters of ``fn`` (not the call arguments of
  ``CALL_ARGS``) plus, where ``fn`` forwards ``**kwargs``, the options of the
  functions it forwards them to (found in its source, ``depth`` calls deep),
  less the keywords it passes itself. Incomplete when a forwarding target
  cannot be followed.
  """
  fn = inspect.unwrap(fn)
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return [], False
  names = [k for k, p in params.items() if p.kind in _NAMED and k not in CALL_ARGS]
  var_kw = next((k for k, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD),
                None)
  if var_kw is None:
    return names, True
  calls = _forwarding_calls(fn, var_kw) if depth > 0 else None
  if calls is None:
    return names, False
  complete = True
  for callee, positional, explicit in calls:
    try:
      bound = list(inspect.signature(callee).parameters)[:positional]
    except (TypeError, ValueError):
      return names, False
    sub, ok = option_names(callee, depth - 1)
    names += [k for k in sub if k not in explicit and k not in bound and k not in names]
    complete = complete and ok
  return names, complete
