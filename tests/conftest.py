"""Shared test settings: deterministic hypothesis profile sized for a 2-core CI."""
import os

os.environ.setdefault("XLA_FLAGS", "")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True,
                          print_blob=True)
settings.load_profile("ci")
