"""Which registered passes can run on this machine: a pass that needs an execution provider
(``Pass.required_provider``, e.g. bfloat16 compute on CUDA) refuses where it is absent, and the
tests that run every pass check that refusal instead."""

from __future__ import annotations

from optimizer.registry import get_pass_class
from optimizer.verify.runtime import resolve_provider


def runnable_here(name: str) -> bool:
    needed = get_pass_class(name).required_provider
    return needed is None or resolve_provider(needed).note is None
