"""One dispatcher: how every op turns ``implementation=`` into a backend.

Each op (``"attention"``, ``"neighborhood"``, ``"linear"``) owns one ordered
table of :class:`Backend` entries. A backend declares, for a call described by
a :class:`Call`, whether it supports it and, when it does not, why (a short
sentence). Resolution is the same for every op:

- ``implementation="reference"``: the dense float32 oracle, always.
- ``implementation="xla"`` / ``"pallas"``: that backend, or
  ``NotImplementedError`` carrying its reason.
- ``implementation=None``: the first backend of the table (fastest first) that
  supports the call on the device it is placed on. When none does, the
  reference runs with a ``UserWarning`` naming every fast backend's reason
  (Python shows it once per call site). The dense oracle is never a silent
  fallback.

Every decision is recorded while :func:`recording` is active;
:func:`attnjax.explain` traces a function with ``jax.eval_shape`` under it, so
it reports which backend each op of the function takes and why, without
running anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax

IMPLEMENTATIONS = ("reference", "xla", "pallas")

__all__ = ["IMPLEMENTATIONS", "Call", "Backend", "Decision", "check_implementation",
           "resolve", "recording", "explain"]


@dataclasses.dataclass(frozen=True)
class Call:
  """What a backend needs to know to judge a call.

  Attributes:
    op: "attention", "neighborhood" or "linear".
    platform: where the computation is placed ("cpu", "gpu", "tpu", ...).
    target: the compile target of the placed device ("tpu_v5e", "sm90", ...),
      None when it is not one the kernels know.
    facts: op-specific facts (e.g. {"bias": True, "segment_ids": False}).
  """
  op: str
  platform: str
  target: Optional[str]
  facts: Dict[str, Any]

  def __getitem__(self, name):
    return self.facts.get(name)


@dataclasses.dataclass(frozen=True)
class Backend:
  """One way to run an op.

  Attributes:
    name: "xla", "pallas" or "reference".
    supports: ``supports(call, explicit)`` -> None when the backend runs the
      call, else the reason it does not. ``explicit`` is True when the user
      named this backend (a kernel that is only opt-in on a target then runs).
  """
  name: str
  supports: Callable[[Call, bool], Optional[str]]


@dataclasses.dataclass(frozen=True)
class Decision:
  """The backend an op call takes and why the ones before it were passed over."""
  op: str
  backend: str
  requested: Optional[str]
  platform: str
  target: Optional[str]
  passed_over: Tuple[Tuple[str, str], ...] = ()

  def __str__(self):
    where = self.target or self.platform
    asked = "implementation=None" if self.requested is None else \
        f"implementation={self.requested!r}"
    text = f"{self.op} on {where} ({asked}): {self.backend}"
    for name, why in self.passed_over:
      text += f"\n  not {name}: {why}"
    return text


def check_implementation(implementation) -> Optional[str]:
  """Validates ``implementation``: one of IMPLEMENTATIONS or None."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}.")
  return implementation


_LOCAL = threading.local()


def _log() -> Optional[List[Decision]]:
  return getattr(_LOCAL, "log", None)


@contextlib.contextmanager
def recording():
  """Collects the Decision of every op call traced inside the block."""
  previous = _log()
  _LOCAL.log = []
  try:
    yield _LOCAL.log
  finally:
    _LOCAL.log = previous


def resolve(call: Call, table: Sequence[Backend], implementation: Optional[str]) -> Decision:
  """The backend that runs ``call``; see the module docstring for the rules."""
  check_implementation(implementation)
  passed: List[Tuple[str, str]] = []
  if implementation == "reference":
    choice = "reference"
  elif implementation is not None:
    entry = next((b for b in table if b.name == implementation), None)
    why = (f"{call.op} has no {implementation!r} backend" if entry is None
           else entry.supports(call, True))
    if why is not None:
      raise NotImplementedError(f"implementation={implementation!r} cannot run this "
                                f"{call.op} call: {why}.")
    choice = implementation
  else:
    choice = None
    for entry in table:
      why = entry.supports(call, False)
      if why is None:
        choice = entry.name
        break
      passed.append((entry.name, why))
    if choice is None:
      choice = "reference"
      reasons = "; ".join(f"{name}: {why}" for name, why in passed)
      warnings.warn(
          f"attnjax: no fast backend supports this {call.op} call, so the dense O(T*S) "
          f"reference runs ({reasons}). Pass implementation='reference' to silence this.",
          UserWarning, stacklevel=4)
  decision = Decision(call.op, choice, implementation, call.platform, call.target,
                      tuple(passed))
  log = _log()
  if log is not None:
    log.append(decision)
  return decision


def explain(fn: Callable, *args, **kwargs) -> List[Decision]:
  """The backend each attnjax op inside ``fn(*args, **kwargs)`` takes, and why.

  ``fn`` is traced with ``jax.eval_shape`` (arrays or ``jax.ShapeDtypeStruct``
  arguments; nothing is computed). Returns the decisions in call order; each
  prints as ``op on target (implementation=...): backend`` followed by the
  reasons the faster backends were passed over.
  """
  with recording() as log:
    jax.eval_shape(fn, *args, **kwargs)
  return list(log)
