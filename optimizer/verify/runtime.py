"""onnxruntime sessions: provider choice, quiet deterministic sessions, errors that quote onnxruntime,
and a time limit on every run.

Models are accepted as a path, serialized bytes or an ``onnx.ModelProto``. Paths go to onnxruntime
unchanged so that external data next to the model file is found. Every session of the tool is
opened by ``create_session`` and every run goes through ``bounded_run`` (``run_session`` and
``run_outputs`` use it), so no run can go on past its stage's ``timeout_s`` (see ``run_limit``).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from optimizer.errors import OptionError, RuntimeSessionError
from optimizer.fileio.model import has_lazy_tensors
from optimizer.fileio.save import save_model
from optimizer.fileio.tensor_checks import iter_tensors
from optimizer.verify.run_limit import DEFAULT_TIMEOUT_S, RunTimeoutError, arm, checked_timeout, disarm, timeout_error

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "DEFAULT_TIMEOUT_S",
    "IN_MEMORY_MODEL",
    "ModelSource",
    "ProviderChoice",
    "RunTimeoutError",
    "as_provider_choice",
    "bounded_run",
    "checked_timeout",
    "create_session",
    "external_data_locations",
    "fallback_note",
    "model_label",
    "resolve_provider",
    "run_outputs",
    "run_session",
    "session_feed",
]

ModelSource = str | os.PathLike | bytes | onnx.ModelProto

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
IN_MEMORY_MODEL = "<in-memory model>"
# The session type, named here so other modules can annotate with it without touching onnxruntime.
Session = onnxruntime.InferenceSession

_PROVIDER_ALIASES = {
    "cpu": "cpu",
    CPU_PROVIDER.lower(): "cpu",
    "cuda": "cuda",
    CUDA_PROVIDER.lower(): "cuda",
}


@dataclass(frozen=True)
class ProviderChoice:
    """What the user asked for, what onnxruntime is given, and why they differ (``note``)."""

    requested: str
    providers: tuple[str, ...]
    note: str | None


def resolve_provider(name: str) -> ProviderChoice:
    """Map "cpu"/"cuda" (or full provider names) to an onnxruntime provider list.

    CUDA falls back to CPU with a note instead of failing, so validation still runs on a
    machine without a GPU; the note says which onnxruntime packages are installed because the
    usual cause is the CPU wheel shadowing ``onnxruntime-gpu``.
    """
    requested = _PROVIDER_ALIASES.get(str(name).strip().lower())
    if requested is None:
        valid = ", ".join(["cpu", "cuda", CPU_PROVIDER, CUDA_PROVIDER])
        raise OptionError(f"unknown execution provider {name!r}; valid names: {valid}")
    if requested == "cpu":
        return ProviderChoice("cpu", (CPU_PROVIDER,), None)
    available = onnxruntime.get_available_providers()
    if CUDA_PROVIDER in available:
        return ProviderChoice("cuda", (CUDA_PROVIDER, CPU_PROVIDER), None)
    installed = _installed_onnxruntime_packages()
    note = (
        f"CUDA requested but onnxruntime has no {CUDA_PROVIDER} "
        f"(installed: {', '.join(installed) or 'unknown'}, available: {', '.join(available)}); "
        "falling back to CPU"
    )
    if "onnxruntime" in installed and "onnxruntime-gpu" in installed:
        note += "; both onnxruntime and onnxruntime-gpu are installed, uninstall onnxruntime"
    return ProviderChoice("cuda", (CPU_PROVIDER,), note)


def _installed_onnxruntime_packages() -> list[str]:
    names = {(dist.metadata["Name"] or "").lower().replace("_", "-") for dist in importlib.metadata.distributions()}
    return sorted(name for name in names if name.startswith("onnxruntime"))


def fallback_note(choice: ProviderChoice, provider_used: str) -> str | None:
    """The choice's note, or one saying that a provider we did pass failed to initialise."""
    if choice.note is not None:
        return choice.note
    if provider_used != choice.providers[0]:
        return (
            f"{choice.providers[0]} was requested but onnxruntime ran the model on "
            f"{provider_used} (the provider failed to initialise)"
        )
    return None


def as_provider_choice(provider: str | ProviderChoice) -> ProviderChoice:
    """Let public functions take either a provider name or an already resolved choice."""
    return provider if isinstance(provider, ProviderChoice) else resolve_provider(provider)


def model_label(model: ModelSource) -> str:
    """How error messages and reports name a model."""
    if isinstance(model, (bytes, onnx.ModelProto)):
        return IN_MEMORY_MODEL
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return f"<{type(model).__name__} object>"


def create_session(
    model: ModelSource,
    provider: ProviderChoice,
    *,
    threads: int | None = None,
    memory_arena: bool = True,
    spinning: bool = True,
    optimized_model_path: str | os.PathLike | None = None,
    config: Mapping[str, str] | None = None,
) -> tuple[onnxruntime.InferenceSession, str]:
    """Open a quiet, deterministic session and report the provider that actually runs it.

    The second value is ``session.get_providers()[0]``: onnxruntime silently falls back to CPU
    when CUDA fails to initialise, and callers must be able to show that. ``memory_arena=False``
    turns off the CPU arena, which keeps its peak for the session's life (calibration opens one
    session per group of tensors: with the arena, PP-OCRv4 det at 736x1984 peaked at 2.7 GB,
    without it 0.74 GB). ``spinning=False`` stops idle worker threads from spinning: with several
    sessions alive (an interleaved benchmark) spinning threads take the cores from the one timed.
    ``optimized_model_path`` saves the graph onnxruntime optimized (the fusion check reads it);
    ``config`` adds session config entries.
    """
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise OptionError(f"threads must be a positive integer or None, got {threads!r}")
    label = model_label(model)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a failure is raised with onnxruntime's words; no second copy on stderr
    options.use_deterministic_compute = True
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = memory_arena
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = os.fspath(optimized_model_path)
    for key, value in sorted((config or {}).items()):
        options.add_session_config_entry(key, value)
    with _saved_if_lazy(model) as model:
        source = _session_source(model)
        try:
            session = onnxruntime.InferenceSession(source, sess_options=options, providers=list(provider.providers))
        except Exception as exc:  # onnxruntime's exceptions share no base class but Exception
            raise RuntimeSessionError(f"onnxruntime cannot load {label}: {_one_line(exc)}") from exc
    return session, session.get_providers()[0]


@contextmanager
def _saved_if_lazy(model: ModelSource) -> Iterator[ModelSource]:
    """A model whose tensors stay on disk (a lazy load of a large model, or arrays a pass spilled),
    saved with external data in a temporary folder for the session to read (onnxruntime cannot
    resolve those references in memory); any other model as it is."""
    if not isinstance(model, onnx.ModelProto) or not has_lazy_tensors(model):
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="onnx-compress-session-") as folder:
        yield save_model(model, Path(folder) / "model.onnx", external_data=True)


def _session_source(model: ModelSource) -> str | bytes:
    if isinstance(model, bytes):
        return model
    if isinstance(model, onnx.ModelProto):
        if external_data_locations(model):
            raise RuntimeSessionError(
                f"{IN_MEMORY_MODEL} references external data files, which onnxruntime "
                "cannot resolve without a folder; pass the model path instead"
            )
        try:
            return model.SerializeToString()
        except ValueError as exc:
            raise RuntimeSessionError(
                f"{IN_MEMORY_MODEL} cannot be serialized ({_one_line(exc)}); models over 2 GB "
                "must be saved with external data and passed as a path"
            ) from exc
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    raise RuntimeSessionError(
        f"unsupported model type {type(model).__name__}; expected a path, bytes or onnx.ModelProto"
    )


def session_feed(
    session: onnxruntime.InferenceSession, feed: Mapping[str, np.ndarray], *, label: str
) -> dict[str, np.ndarray]:
    """The part of ``feed`` this session declares as inputs.

    Feeding only declared inputs lets a candidate whose unused inputs were pruned run on the
    reference's feeds.
    """
    input_names = [node_arg.name for node_arg in session.get_inputs()]
    missing = [name for name in input_names if name not in feed]
    if missing:
        raise RuntimeSessionError(f"{label} needs input(s) {', '.join(missing)} that the feed does not provide")
    return {name: feed[name] for name in input_names}


DEFAULT_STAGE = "onnxruntime run"


@contextmanager
def bounded_run(
    label: str, *, stage: str = DEFAULT_STAGE, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> Iterator[onnxruntime.RunOptions]:
    """RunOptions for one ``session.run`` in the block, which the watchdog stops after ``timeout_s``.

    A stopped run raises ``RunTimeoutError`` naming ``stage`` and ``label``; any other failure of
    onnxruntime in the block becomes ``RuntimeSessionError`` quoting it. Keep the block to the run
    itself (a benchmark times inside it, with the watchdog armed outside the timing).
    """
    options = onnxruntime.RunOptions()
    options.log_severity_level = 4  # the error is raised with onnxruntime's words; no second copy on stderr
    token = arm(options, timeout_s)
    try:
        yield options
    except RuntimeSessionError:
        raise
    except Exception as exc:  # see create_session
        if options.terminate:
            raise timeout_error(stage, float(timeout_s or 0), label) from exc
        raise RuntimeSessionError(f"onnxruntime failed to run {label}: {_one_line(exc)}") from exc
    finally:
        disarm(token)


def run_outputs(
    session: onnxruntime.InferenceSession,
    output_names: Sequence[str] | None,
    inputs: Mapping[str, np.ndarray],
    *,
    label: str,
    stage: str = DEFAULT_STAGE,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> list[np.ndarray]:
    """``session.run(output_names, inputs)`` within ``timeout_s`` (see ``bounded_run``)."""
    with bounded_run(label, stage=stage, timeout_s=timeout_s) as options:
        return session.run(None if output_names is None else list(output_names), dict(inputs), options)


def run_session(
    session: onnxruntime.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    label: str,
    stage: str = DEFAULT_STAGE,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """Run one sample (see ``session_feed``) within ``timeout_s``; outputs keyed by name."""
    output_names = [node_arg.name for node_arg in session.get_outputs()]
    values = run_outputs(
        session, output_names, session_feed(session, feed, label=label), label=label, stage=stage, timeout_s=timeout_s
    )
    return dict(zip(output_names, values, strict=True))


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """Sorted, unique ``location`` entries of every tensor stored outside the model file."""
    locations = set()
    for tensor, _ in iter_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return sorted(locations)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
