"""One declaration per attention family: the ``@family`` decorator and its table.

A family is a parameter-free function

    fn(query, key, value, *, causal, q_positions=None, k_positions=None,
       segment_ids=None, **options) -> out [B, T, N, Hv]

declared once where it is written::

    @family("sliding_window", options=ATTEND_OPTIONS, supports_kv_cache=True,
            padding="segment_ids")
    def sliding_window(query, key, value, *, causal, ..., window=256, left=None,
                       right=None, **kw): ...

The declaration holds everything the layers need to know: the name (and
aliases), the options the family accepts (the named keyword parameters of the
function plus ``options``, the ones it forwards through ``**kw``), whether it
honours explicit positions over a partly filled KV cache
(``supports_kv_cache``), and how ``attnjax.layers.MultiHeadAttention`` hands it
a padded batch (``padding``: one of :data:`PADDING_ROUTES`; ``no_padding``:
why it cannot take one, see ``attnjax.layers.padding``). The decorator
returns a checked function: an option outside the declared ones raises
ValueError naming the option, the family and the accepted options, before the
family runs.

Option names follow one spelling per concept: the table in ``docs/naming.md``.
This module imports nothing from attnjax, so every engine package can declare
its families here without an import cycle; ``attnjax.layers.registry`` is the
view the layers read.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

__all__ = ["CALL_ARGS", "PADDING_ROUTES", "FamilySpec", "declare", "declared", "family", "family_spec",
           "families_of", "unknown_option_error"]

#: Arguments every family receives from the layer itself: never options.
CALL_ARGS = ("query", "key", "value", "causal", "q_positions", "k_positions", "segment_ids")
#: How a family takes a padded batch (``attnjax.layers.padding``).
PADDING_ROUTES = ("segment_ids", "key_mask", "causal_prefix")
_NAMED = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
  """Everything declared about one family.

  Attributes:
    name: the registry name; ``aliases`` are further names of the same family.
    fn: the checked family function (what ``get_family`` returns).
    impl: the function as written (no option check).
    options: accepted option names, in declaration order.
    supports_kv_cache: honours ``q_positions``/``k_positions`` over a partly
      filled cache (decoding).
    padding: the key-padding route (one of ``PADDING_ROUTES``) or None.
    no_padding: why the family cannot take (some) padded batches, or None.
    module: the module that declared it.
  """
  name: str
  fn: Callable
  impl: Callable
  options: Tuple[str, ...]
  supports_kv_cache: bool = False
  padding: Optional[str] = None
  no_padding: Optional[str] = None
  aliases: Tuple[str, ...] = ()
  module: str = ""


_TABLE: Dict[str, FamilySpec] = {}


def _signature_options(fn: Callable) -> Tuple[Tuple[str, ...], bool]:
  """(named keyword parameters of ``fn`` that are options, whether it takes ``**kw``)."""
  params = inspect.signature(fn).parameters
  names = tuple(k for k, p in params.items() if p.kind in _NAMED and k not in CALL_ARGS)
  var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  return names, var_kw


def unknown_option_error(name: str, unknown: Sequence[str], accepted: Sequence[str]):
  """The ValueError for options ``unknown`` given to family ``name``."""
  hints = ""
  for u in unknown:
    close = difflib.get_close_matches(u, accepted, n=1)
    if close:
      hints += f" (did you mean {close[0]!r} for {u!r}?)"
  what = f"option {unknown[0]!r}" if len(unknown) == 1 else f"options {list(unknown)}"
  return ValueError(
      f"attention family {name!r} has no {what}{hints}; it accepts "
      f"{', '.join(accepted) or 'no options'} (spellings: docs/naming.md).")


def _checked(name: str, impl: Callable, options: Tuple[str, ...]) -> Callable:
  accepted = frozenset(options)

  def fn(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None,
         **kw):
    unknown = [k for k in kw if k not in accepted]
    if unknown:
      raise unknown_option_error(name, unknown, options)
    return impl(query, key, value, causal=causal, q_positions=q_positions,
                k_positions=k_positions, segment_ids=segment_ids, **kw)

  # The signature lists every accepted option by name (and no **kw), so that
  # inspect.signature, and tools built on it, see the declaration.
  own = inspect.signature(impl).parameters
  kw_only = inspect.Parameter.KEYWORD_ONLY
  params = [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for a in ("query", "key", "value")]
  params.append(inspect.Parameter("causal", kw_only))
  params += [inspect.Parameter(a, kw_only, default=None)
             for a in ("q_positions", "k_positions", "segment_ids")]
  params += [inspect.Parameter(o, kw_only, default=own[o].default if o in own
                               else inspect.Parameter.empty) for o in options]
  fn.__signature__ = inspect.Signature(params)
  fn.__name__ = getattr(impl, "__name__", name)
  fn.__qualname__ = getattr(impl, "__qualname__", name)
  fn.__module__ = getattr(impl, "__module__", __name__)
  fn.__doc__ = impl.__doc__
  return fn


def declare(name: str, impl: Callable, *, options: Iterable[str] = (),
            supports_kv_cache: bool = False, padding: Optional[str] = None,
            no_padding: Optional[str] = None, aliases: Iterable[str] = ()) -> Callable:
  """``impl`` checked and described as family ``name``, without adding it to the table.

  Arguments as :func:`family`; returns the checked function (its declaration
  in the attribute ``family_spec``).
  """
  options, aliases = tuple(options), tuple(aliases)
  for n in (name,) + aliases:
    if not isinstance(n, str) or not n:
      raise ValueError(f"family name must be a non-empty string, got {n!r}.")
  if not callable(impl):
    raise TypeError(f"family {name!r} must be callable, got {type(impl).__name__}.")
  if padding is not None and padding not in PADDING_ROUTES:
    raise ValueError(f"family {name!r}: padding must be one of {PADDING_ROUTES} or None, got "
                     f"{padding!r}.")
  own, var_kw = _signature_options(impl)
  if var_kw and not options:
    raise ValueError(f"family {name!r} forwards **kwargs: declare the options it forwards "
                     "(options=...).")
  if not var_kw and set(options) - set(own):
    raise ValueError(f"family {name!r} declares options {sorted(set(options) - set(own))} "
                     "that its function does not take.")
  accepted = own + tuple(o for o in options if o not in own)
  checked = _checked(name, impl, accepted)
  spec = FamilySpec(name, checked, impl, accepted, bool(supports_kv_cache), padding,
                    no_padding, aliases, getattr(impl, "__module__", "") or "")
  # The attribute protocol of user-registered functions, read from the declaration.
  checked.family_spec = spec
  checked.supports_kv_cache = spec.supports_kv_cache
  if padding is not None:
    checked.key_padding = padding
  if no_padding is not None:
    checked.no_key_padding = no_padding
  return checked


def family(name: str, *, options: Iterable[str] = (), supports_kv_cache: bool = False,
           padding: Optional[str] = None, no_padding: Optional[str] = None,
           aliases: Iterable[str] = ()) -> Callable[[Callable], Callable]:
  """Declares the decorated function as attention family ``name``; returns it checked.

  Args:
    name: registry name (``MultiHeadAttention(attention=name)``).
    options: option names the function forwards through ``**kw`` (its own
      named keyword parameters are options already). A function taking
      ``**kw`` must declare them; one without ``**kw`` cannot add any.
    supports_kv_cache: the family honours explicit positions over a partly
      filled KV cache.
    padding: key-padding route, one of ``PADDING_ROUTES``, or None.
    no_padding: why the family cannot take a padded batch (or, with a
      ``padding`` route, the calls it cannot take one in).
    aliases: further registry names of the same family.

  Raises:
    ValueError: ``name`` (or an alias) is declared twice, ``padding`` is not a
      route, or the options do not match the function.
  """

  def register(impl: Callable) -> Callable:
    checked = declare(name, impl, options=options, supports_kv_cache=supports_kv_cache,
                      padding=padding, no_padding=no_padding, aliases=aliases)
    spec = checked.family_spec
    for n in (name,) + spec.aliases:
      old = _TABLE.get(n)
      if old is not None and old.module != spec.module:
        raise ValueError(f"attention family {n!r} is declared twice: in {old.module} and "
                         f"{spec.module}.")
    for n in (name,) + spec.aliases:
      _TABLE[n] = spec
    return checked

  return register


def declared() -> Dict[str, FamilySpec]:
  """Name (aliases included) -> spec of every family declared so far (engines imported)."""
  return dict(_TABLE)


def families_of(module: str) -> Dict[str, Callable]:
  """Name -> checked function of the families declared in ``module`` (aliases included)."""
  return {n: s.fn for n, s in _TABLE.items() if s.module == module}


def family_spec(fn: Callable, name: str = "") -> FamilySpec:
  """The declaration of ``fn``; for an undeclared function, one read from its attributes.

  Undeclared (user-registered) functions describe themselves with the
  attributes ``supports_kv_cache``, ``key_padding`` and ``no_key_padding``;
  their options are their named keyword parameters (none are checked when they
  take ``**kwargs``).
  """
  spec = getattr(fn, "family_spec", None)
  if isinstance(spec, FamilySpec):
    return spec
  try:
    own, _ = _signature_options(fn)
  except (TypeError, ValueError):
    own = ()
  return FamilySpec(name or getattr(fn, "__name__", "?"), fn, fn, own,
                    bool(getattr(fn, "supports_kv_cache", False)),
                    getattr(fn, "key_padding", None), getattr(fn, "no_key_padding", None),
                    (), getattr(fn, "__module__", "") or "")
