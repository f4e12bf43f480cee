"""Where independent trials run: local worker processes, or Ray actors on one machine or many.

A trial is a picklable function called on a small picklable item in a worker that was set up once
with the shared state (model, passes, data) by ``initializer(*initargs)``: the accuracy budget's
compressions (``optimizer.budget``) and auto mode's candidate builds and checks
(``optimizer.auto_mode``). ``--workers N`` runs N local processes, spawned, that die with the
process that started them; ``--executor ray`` runs N Ray actors, on the cluster at
``--ray-address`` or on a local instance started for the run and stopped after it (the ``ray``
extra: ``pip install 'onnx-compress[ray]'``; a cluster's nodes need onnx-compress installed and
the model's path readable). Latency is never measured inside a trial: trials share cores, so
timing runs in the calling process after them, one set of models at a time.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from optimizer.errors import OptionError
from optimizer.verify.isolation import die_with_parent, spawn_without_main_script

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray: pip install 'onnx-compress[ray]' (or pip install ray)"


@dataclass(frozen=True, kw_only=True)
class ExecutorOptions:
    """``kind`` local or ray; ``workers`` trials at a time (local: 1 means in this process);
    ``ray_address`` an existing Ray cluster (None: a local Ray instance for this run)."""

    kind: str = "local"
    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise OptionError(f"executor must be one of {', '.join(EXECUTORS)}; got {self.kind!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise OptionError(f"workers must be a positive integer; got {self.workers!r}")
        if self.ray_address is not None and self.kind != "ray":
            raise OptionError("a Ray address needs --executor ray")

    @property
    def parallel(self) -> bool:
        """True when trials run in workers (a local process pool or Ray), not in this process."""
        return self.kind == "ray" or self.workers > 1

    def describe(self) -> str:
        if self.kind == "ray":
            where = f"the Ray cluster at {self.ray_address}" if self.ray_address else "a local Ray instance"
            return f"{self.workers} Ray actor(s) on {where}"
        return f"{self.workers} local process(es)" if self.workers > 1 else "this process"


class TrialPool(Protocol):
    def map(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]: ...

    def close(self) -> None: ...


def open_pool(options: ExecutorOptions, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> TrialPool:
    """Workers set up by ``initializer(*initargs)``; ``options.parallel`` must be true."""
    if options.kind == "ray":
        return RayPool(options, initializer, initargs)
    return LocalPool(options.workers, initializer, initargs)


class LocalPool:
    """Spawned processes that end when this process ends, however it ends (``die_with_parent``)."""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
        context = multiprocessing.get_context("spawn")
        self.lifeline = context.Pipe(duplex=False)
        self.pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_local_worker,
            initargs=((self.lifeline[0], os.getpid()), initializer, initargs),
        )

    def map(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        with spawn_without_main_script():
            return list(self.pool.map(function, items))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        for end in self.lifeline:
            end.close()


def _local_worker(parent: tuple[Any, int], initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    die_with_parent(*parent)
    initializer(*initargs)


class RayPool:
    """One Ray actor per worker, each set up once; items go round-robin to the actors."""

    def __init__(self, options: ExecutorOptions, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
        ray = import_ray()
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(
                address=options.ray_address,
                num_cpus=None if options.ray_address else options.workers,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        worker = ray.remote(num_cpus=1)(_RayWorker)
        shared = ray.put(initargs)
        self.actors = [worker.remote(initializer, shared) for _ in range(options.workers)]

    def map(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        calls = [self.actors[i % len(self.actors)].call.remote(function, item) for i, item in enumerate(items)]
        return list(self.ray.get(calls))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


class _RayWorker:
    def __init__(self, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
        initializer(*initargs)

    def call(self, function: Callable[[Any], Any], item: Any) -> Any:
        return function(item)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise OptionError(RAY_MISSING) from error
    return ray
