"""CineCut's inference engine from Python: CineCut's ``cinecut.inference`` API, run by the Rust engine.

Every call here runs the engine (``engine-core``): the VRAM checks, the machine-wide GPU lock, the
supervised ``llama-server`` child and its requests. Long calls release the GIL, and Ctrl-C raises
``KeyboardInterrupt`` at once, leaving no server, lock or VRAM behind.

>>> from cinecut_engine import LlavaEngine, GPU_LOCK   # doctest: +SKIP
>>> with LlavaEngine("ggml-model-q4_k.gguf", "mmproj-model-f16.gguf") as engine:  # doctest: +SKIP
...     scene = engine.describe_frame(record)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, TypeVar, Union

from . import _engine

__all__ = [
    "GPU_LOCK",
    "GpuLock",
    "gpu_lock",
    "LlavaEngine",
    "TextEngine",
    "SceneDescription",
    "SCENE_DESCRIPTION_SCHEMA",
    "SceneValidationError",
    "validate_scene_description",
    "check_vram_free_mib",
    "assert_vram_available",
    "wait_for_vram",
    "VRAM_MINIMUM_MIB",
    "CineCutEngineError",
    "VramError",
    "InferenceError",
    "StartError",
    "RequestError",
    "run_inference_stage",
]

log = logging.getLogger("cinecut_engine")

#: Minimum free VRAM in MiB for LLaVA 1.5 7B Q4 and its context (CineCut's 6 GB).
VRAM_MINIMUM_MIB: int = _engine.VRAM_MINIMUM_MIB

#: The base of the engine's errors; ``.detail`` says what failed, with the value and the fix.
CineCutEngineError = _engine.EngineFailure
#: Free VRAM could not be read, or is below the minimum: ``gpu``, ``free_mib`` and
#: ``required_mib`` where known (else None).
VramError = _engine.VramError
#: Starting, using or stopping llama-server failed, or an answer was unusable: the base of
#: StartError and RequestError.
InferenceError = _engine.InferenceError
#: llama-server did not start (whatever was started was stopped, the lock released):
#: ``exit_code`` or ``signal`` and ``output_tail`` where the server exited.
StartError = _engine.StartError
#: A request was not answered: ``kind`` (server_died, bad_image, invalid_prompt, http, timeout,
#: transport, invalid_output, context_exhausted, not_attempted, cancelled), ``subject`` (the frame
#: or request), ``status`` (HTTP), and ``exit_code`` or ``signal`` for a server that died.
RequestError = _engine.RequestError


def _detail(self: BaseException) -> str:
    return str(self.args[0]) if self.args else ""


setattr(CineCutEngineError, "detail", property(_detail, doc="What failed, with the value and the fix."))
# The attributes every instance has, None until the engine sets them (an exception made by hand
# has them too).
for _name in ("gpu", "free_mib", "required_mib"):
    setattr(VramError, _name, None)
for _name in ("exit_code", "signal", "output_tail"):
    setattr(StartError, _name, None)
for _name in ("kind", "subject", "status", "exit_code", "signal"):
    setattr(RequestError, _name, None)

PathLike = Union[str, Path]


@dataclasses.dataclass(frozen=True)
class SceneDescription:
    """A keyframe's description, as the vision model gives it."""

    visual_content: str
    mood: str
    action: str
    setting: str


#: The JSON schema of SceneDescription, exactly as CineCut's plan gives it (sent to llama-server).
SCENE_DESCRIPTION_SCHEMA: Dict[str, Any] = json.loads(_engine.scene_schema_json())

_FIELDS = tuple(f.name for f in dataclasses.fields(SceneDescription))


class SceneValidationError(ValueError):
    """A value that is not a SceneDescription; the message names each field that is wrong."""


def validate_scene_description(data: Dict[str, Any]) -> SceneDescription:
    """Validates ``data`` against SCENE_DESCRIPTION_SCHEMA (the engine's validator) and converts it.

    Raises SceneValidationError (a ValueError) naming every field that is missing, of the wrong
    type, or not in the schema.
    """
    if not isinstance(data, dict):
        raise SceneValidationError(f"not a SceneDescription: a dict is needed, not {type(data).__name__}")
    # What a Python value can get wrong before it is JSON (NaN, a lone surrogate, a set), by field.
    early = [f"/{name}: {data[name]!r} is not a string" for name in _FIELDS
             if name in data and not isinstance(data[name], str)]
    if early:
        raise SceneValidationError("not a SceneDescription: " + "; ".join(early))
    try:
        violations = _engine.scene_violations(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise SceneValidationError(f"not a SceneDescription: not JSON ({e})") from None
    if violations:
        raise SceneValidationError("not a SceneDescription: " + "; ".join(violations))
    return SceneDescription(**{name: data[name] for name in _FIELDS})


def _scene(text: str) -> SceneDescription:
    data = json.loads(text)
    return SceneDescription(**{name: data[name] for name in _FIELDS})


def check_vram_free_mib(gpu: int = 0) -> int:
    """Free VRAM of GPU ``gpu`` in MiB (NVML, else nvidia-smi; ``NVIDIA_SMI`` names the program).

    Raises VramError when it cannot be read, or is below VRAM_MINIMUM_MIB
    ("Only {free} MiB free VRAM, need at least {min} MiB ...").
    """
    return _engine.vram_free_mib(gpu, VRAM_MINIMUM_MIB)


def assert_vram_available(gpu: int = 0) -> None:
    """Raises VramError unless GPU ``gpu`` has VRAM_MINIMUM_MIB free."""
    check_vram_free_mib(gpu)


def wait_for_vram(
    min_free_mib: int = VRAM_MINIMUM_MIB,
    poll_interval_s: float = 2.0,
    timeout_s: float = 60.0,
    gpu: int = 0,
) -> int:
    """Waits until GPU ``gpu`` has ``min_free_mib`` free (after another model's server stopped),
    asking every ``poll_interval_s``; returns the free MiB. Raises VramError naming the last reading
    when ``timeout_s`` passes, or at once when VRAM cannot be read. The engine's own wait
    (``wait_for_free``); Ctrl-C ends it at once.
    """
    return _engine.wait_for_vram(min_free_mib, poll_interval_s, timeout_s, gpu)


class GpuLock:
    """The engine's per-GPU lock, machine-wide (every process of every user), with
    ``threading.Lock``'s methods. Held by a Python stage, it keeps a LlavaEngine in this process and a
    ``cinecut-infer`` in another off the GPU, and the other way round. Not reentrant.
    """

    def __init__(self, gpu: int = 0) -> None:
        self._lock = _engine.GpuLock(gpu)
        #: The thread that holds it (an engine started by that thread would wait for it for ever).
        self._owner: Optional[int] = None
        _ALL_LOCKS.add(self)

    @property
    def gpu(self) -> int:
        """The GPU (nvidia-smi index)."""
        return self._lock.gpu

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Takes the lock: waits (at most ``timeout`` seconds unless -1), or tries once
        (``blocking=False``). True when taken. Ctrl-C interrupts the wait."""
        taken: bool = self._lock.acquire(blocking, float(timeout))
        if taken:
            self._owner = threading.get_ident()
        return taken

    def release(self) -> None:
        """Releases the lock; RuntimeError if this object does not hold it."""
        self._lock.release()
        self._owner = None

    def locked(self) -> bool:
        """Whether anyone holds this GPU's lock."""
        return self._lock.locked()

    def __enter__(self) -> "GpuLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<cinecut_engine.GpuLock gpu={self.gpu} locked={self.locked()}>"


_LOCKS: Dict[int, GpuLock] = {}
_ALL_LOCKS: "weakref.WeakSet[GpuLock]" = weakref.WeakSet()


def _held_here() -> List[int]:
    """The GPUs whose lock this thread holds through a GpuLock."""
    me = threading.get_ident()
    return [lock.gpu for lock in list(_ALL_LOCKS) if lock._owner == me]


def gpu_lock(gpu: int) -> GpuLock:
    """The lock of GPU ``gpu`` (the same object for the same GPU)."""
    if gpu not in _LOCKS:
        _LOCKS[gpu] = GpuLock(gpu)
    return _LOCKS[gpu]


#: GPU 0's lock: ``with GPU_LOCK:`` around a stage's GPU work (the FFmpeg conform, say).
GPU_LOCK: GpuLock = gpu_lock(0)


class KeyframeLike(Protocol):
    """What the engine reads from a record: CineCut's ``KeyframeRecord`` dataclass fits."""

    timestamp_s: float
    frame_path: Any
    source: str


_S = TypeVar("_S", bound="_Server")
_R = TypeVar("_R", bound=KeyframeLike)


class _Server:
    """What LlavaEngine and TextEngine share: the engine's lifecycle as a context manager, on one
    GPU or (``gpus=[0, 1]`` or ``gpus="all"``) one server per GPU used as one."""

    def __init__(self, engine: Any, port: int) -> None:
        self._engine = engine
        self._port = port

    def __enter__(self: _S) -> _S:
        # Already running: the engine a swap started (``with vision.swap(TextEngine(...)) as text:``).
        if not self._engine.running:
            self._engine.start(_held_here())
            for gpu, why in self._engine.left_out:
                log.warning("%s left out: %s", gpu, why)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._engine.stop()
        except InferenceError as e:
            log.warning("llama-server had died before the stop: %s", e.detail)

    def swap(self, next: _S) -> _S:
        """Stops this engine's server, waits for its VRAM and starts ``next``'s on the same GPU,
        holding the GPU lock throughout (the engine's swap): no other process can take the GPU
        between the two models. Returns ``next``, running (use it as ``with vision.swap(TextEngine(
        ...)) as text:``); this engine is then stopped. A failed swap leaves nothing running and the
        lock released, and raises."""
        self._engine.swap(next._engine)
        return next

    @property
    def running(self) -> bool:
        """Whether the server runs."""
        return bool(self._engine.running)

    @property
    def port(self) -> int:
        """The port the (first) server listens on (the one chosen, for port 0)."""
        return int(self._engine.port) if self._engine.running else self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The (first) server's pid (while running)."""
        return int(self._engine.pid)

    @property
    def pids(self) -> List[int]:
        """Every server's pid, one per GPU (while running)."""
        return list(self._engine.pids)

    @property
    def gpus(self) -> List[int]:
        """The GPUs (nvidia-smi indices) the servers run on (while running)."""
        return list(self._engine.gpus)

    @property
    def api_key(self) -> str:
        """The server's API key: every endpoint but /health needs ``Authorization: Bearer KEY``."""
        return str(self._engine.api_key)


class LlavaEngine(_Server):
    """The vision model's server as a context manager: ``__enter__`` checks VRAM, takes the GPU lock
    and starts llama-server; ``__exit__`` stops it, waits for VRAM and releases the lock, also when
    the block raises.

    ``options``: slots, ctx_size, gpu, gpus (a list of GPUs, or "all": one server per GPU, the
    frames going to whichever has a free slot), gpu_layers, min_vram_mib, startup_timeout_s,
    request_timeout_s, retries, prompt, max_tokens, temperature, server_bin, nvidia_smi,
    server_args, vram_recovery_timeout_s, stop_grace_s.
    """

    def __init__(
        self,
        model_path: PathLike,
        mmproj_path: PathLike,
        port: int = 8089,
        debug: bool = False,
        **options: Any,
    ) -> None:
        self.model_path = Path(model_path)
        self.mmproj_path = Path(mmproj_path)
        self.debug = debug
        slots = options.get("slots", 1)
        if not isinstance(slots, int) or isinstance(slots, bool):
            raise ValueError(f"slots= takes a whole number of slots (1 or more), not {slots!r}")
        self._slots = slots
        self.last_summary: Optional[Dict[str, Any]] = None
        """What the last ``describe_frames`` did, as the CLI's ``--summary`` writes it: items,
        answered, failed, not_attempted, retries, wall_s, items_per_s, latency_ms {p50, p95, max},
        tokens {prompt, generated, prompt_per_s, generated_per_s}, gpus [{gpu, uuid, answered,
        failed, died}] and its moments (``started_at``, ... as RFC 3339 and Unix seconds)."""
        super().__init__(
            _engine.Engine(str(model_path), str(mmproj_path), port, debug, options), port
        )

    def describe(self, record: KeyframeLike, timeout_s: float = 60.0) -> SceneDescription:
        """Describes one keyframe; raises RequestError (with ``.detail``) when it cannot."""
        return _scene(self._engine.describe(str(record.frame_path), timeout_s))

    def describe_frame(self, record: KeyframeLike, timeout_s: float = 60.0) -> Optional[SceneDescription]:
        """Describes one keyframe; None when it cannot (the reason goes to ``logging``). Use outside
        the ``with`` block raises RuntimeError."""
        try:
            return self.describe(record, timeout_s)
        except InferenceError as e:
            log.warning("frame %s not described: %s", record.frame_path, e.detail)
            return None

    def describe_frames(
        self,
        records: Sequence[KeyframeLike],
        concurrency: Optional[int] = None,
        progress_callback: Optional[Callable[[int, int], Any]] = None,
    ) -> List[Optional[SceneDescription]]:
        """Describes every record with the slots busy (``concurrency`` at once on one GPU, default
        the slots; every server's slots with ``gpus``), in input order; None where a frame failed
        (logged). ``progress_callback(done, total)`` after each frame. A server that dies hands its
        frames in flight to the others (logged). ``last_summary`` then says what the batch did."""
        records = list(records)
        pairs, deaths, summary = self._engine.describe_many(
            [str(r.frame_path) for r in records], concurrency or self._slots, progress_callback
        )
        self.last_summary = json.loads(summary)
        for gpu, status, handed_over in deaths:
            log.warning(
                "GPU %d's server died (%s); %s", gpu, status,
                f"the other GPUs took its {handed_over} frame(s) in flight" if handed_over
                else "its frames' results say what became of them",
            )
        results: List[Optional[SceneDescription]] = []
        for record, (scene, error) in zip(records, pairs):
            if scene is None:
                log.warning("frame %s not described: %s", record.frame_path, error)
                results.append(None)
            else:
                results.append(_scene(scene))
        return results


class TextEngine(_Server):
    """A text-only model's server (no mmproj), such as CineCut's subtitle stage, as a context
    manager; ``complete`` answers any JSON schema. ``options`` as for LlavaEngine."""

    def __init__(self, model_path: PathLike, port: int = 8090, debug: bool = False, **options: Any) -> None:
        self.model_path = Path(model_path)
        self.debug = debug
        super().__init__(_engine.Engine(str(model_path), None, port, debug, options), port)

    def complete(
        self,
        schema: Dict[str, Any],
        text: str,
        system: Optional[str] = None,
        max_tokens: int = 128,
        temperature: float = 0.1,
        timeout_s: float = 60.0,
    ) -> Optional[Any]:
        """The model's answer to ``text`` under ``schema``, validated (a dict for an object schema);
        None when there is none (the reason goes to ``logging``). Bad arguments raise ValueError;
        use outside the ``with`` block raises RuntimeError."""
        try:
            answer = self._engine.complete(
                json.dumps(schema), text, system, max_tokens, temperature, [], timeout_s
            )
        except InferenceError as e:
            log.warning("no answer: %s", e.detail)
            return None
        return json.loads(answer)


def run_inference_stage(
    records: Iterable[_R],
    model_path: PathLike,
    mmproj_path: PathLike,
    progress_callback: Optional[Callable[[int, int], Any]] = None,
    gpus: Optional[Union[Sequence[Union[int, str]], str]] = None,
    **options: Any,
) -> List[Tuple[_R, Optional[SceneDescription]]]:
    """CineCut's stage 4: every record with its description (None where a frame is missing or
    bad), in input order; ``progress_callback(done, total)`` after each frame. ``gpus=[0, 1]`` (or
    ``"all"``) runs one server per GPU, the frames going to whichever has a free slot, a dying
    server's frames handed to the others."""
    records = list(records)
    if gpus is not None:
        options["gpus"] = gpus
    with LlavaEngine(model_path, mmproj_path, **options) as engine:
        scenes = engine.describe_frames(records, progress_callback=progress_callback)
    return list(zip(records, scenes))
