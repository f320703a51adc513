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
import logging
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, TypeVar, Union

from . import _engine
from ._types import (
    CineCutEngineError,
    InferenceError,
    RequestError,
    SceneDescription,
    StartError,
    VramError,
)

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
    "OPTIONS",
]

log = logging.getLogger("cinecut_engine")

#: Minimum free VRAM in MiB for LLaVA 1.5 7B Q4 and its context (CineCut's 6 GB).
VRAM_MINIMUM_MIB: int = _engine.VRAM_MINIMUM_MIB

#: The names the engines take as ``**options`` (the CLI's flags, as keywords).
OPTIONS: List[str] = list(_engine.OPTIONS)

PathLike = Union[str, Path]


#: The JSON schema of SceneDescription, exactly as CineCut's plan gives it (sent to llama-server).
SCENE_DESCRIPTION_SCHEMA: Dict[str, Any] = _engine.scene_schema()

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
        violations = _engine.scene_violations(data)
    except ValueError as e:
        raise SceneValidationError(f"not a SceneDescription: {e}") from None
    if violations:
        raise SceneValidationError("not a SceneDescription: " + "; ".join(violations))
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

    def __init__(self, engine: Any, port: Any) -> None:
        self._engine = engine
        self._port = port
        #: Inside a ``with`` block of this engine (the block owns the servers; a second one would
        #: stop them when it ends, under the first).
        self._entered = False

    def __enter__(self: _S) -> _S:
        if self._entered:
            raise RuntimeError(
                "this engine is already in a `with` block: use the engine it gave, not a second "
                "`with` (whose end would stop the servers under the first)"
            )
        # Already running: the engine a swap started (``with vision.swap(TextEngine(...)) as text:``).
        if not self._engine.running:
            self._engine.start(_held_here())
            for gpu, why in self._engine.left_out:
                log.warning("%s left out: %s", gpu, why)
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._engine.stop()
        except InferenceError as e:
            log.warning("llama-server had died before the stop: %s", e.detail)
        finally:
            self._entered = self._engine.running

    def swap(self, next: _S) -> _S:
        """Stops this engine's server, waits for its VRAM and starts ``next``'s on the same GPU,
        holding the GPU lock throughout (the engine's swap): no other process can take the GPU
        between the two models. Returns ``next``, running (use it as ``with vision.swap(TextEngine(
        ...)) as text:``); this engine is then stopped. A failed swap leaves nothing running and the
        lock released, and raises."""
        self._engine.swap(next._engine)
        self._entered = False
        return next

    @property
    def running(self) -> bool:
        """Whether the server runs."""
        return bool(self._engine.running)

    @property
    def port(self) -> int:
        """The port the (first) server listens on (the one chosen, for port 0)."""
        return int(self._engine.port) if self._engine.running else int(self._port)

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
        """Every server's pid (while running): one per GPU, or several per GPU with
        ``servers_per_gpu``."""
        return list(self._engine.pids)

    @property
    def gpus(self) -> List[int]:
        """The GPU (nvidia-smi index) of each server, in the order of ``pids`` (while running)."""
        return list(self._engine.gpus)

    @property
    def slots(self) -> int:
        """Requests the servers serve at once, over all of them (``slots="auto"`` resolved)."""
        return int(self._engine.slots)

    @property
    def api_key(self) -> str:
        """The server's API key: every endpoint but /health needs ``Authorization: Bearer KEY``."""
        return str(self._engine.api_key)


class LlavaEngine(_Server):
    """The vision model's server as a context manager: ``__enter__`` checks VRAM, takes the GPU lock
    and starts llama-server; ``__exit__`` stops it, waits for VRAM and releases the lock, also when
    the block raises.

    ``options`` (every one the CLI has a flag for):

    - ``slots``: requests in flight on each GPU, split over its servers (a number, or ``"auto"``:
      as many as its free VRAM holds, from the model's own numbers);
    - ``servers_per_gpu``: llama-servers on each GPU, started as one unit under its lock (a number,
      or ``"auto"``: under a grammar, as many as the host's cores, the free VRAM and the slots make
      worthwhile; with ``grammar="off"``, one);
    - ``gpu`` (one GPU: an index or a UUID) or ``gpus`` (a list, or ``"all"``: the frames go to
      whichever server has a free slot), not both;
    - ``ctx_size``, ``gpu_layers``, ``threads``, ``server_args``: the server's ``-c`` per slot,
      ``-ngl``, ``-t`` and further arguments;
    - ``min_vram_mib``, ``vram_probe`` (``"auto"``, ``"nvml"``, ``"nvidia-smi"``), ``nvidia_smi``;
    - ``startup_timeout_s``, ``request_timeout_s``, ``vram_recovery_timeout_s``, ``stop_grace_s``;
    - ``retries``, ``prompt``, ``max_tokens``, ``temperature``, ``grammar`` (how answers are held
      to the schema: ``"gbnf"``, the engine's own grammar, by default; ``"llguidance"``;
      ``"response-format"``; ``"off"``);
    - ``server_bin``, ``image_transport`` (``"auto"`` or ``"base64"``).
    """

    def __init__(
        self,
        model_path: PathLike,
        mmproj_path: PathLike,
        port: Any = 8089,
        debug: bool = False,
        **options: Any,
    ) -> None:
        self.model_path = Path(model_path)
        self.mmproj_path = Path(mmproj_path)
        self.debug = debug
        self.last_summary: Optional[Dict[str, Any]] = None
        """What the last ``describe_frames`` did, as the CLI's ``--summary`` writes it: items,
        answered, failed, not_attempted, not_written, retries, wall_s, serving_s, items_per_s,
        latency_ms {p50, p95, max}, tokens {prompt, generated, prompt_per_s, generated_per_s}, gpus
        [{gpu, uuid, servers, answered, failed, died, each: [{answered, failed, died, handed_over}]}]
        and its moments (``started_at``, ... as RFC 3339 and Unix seconds)."""
        super().__init__(
            _engine.Engine(str(model_path), str(mmproj_path), port, debug, options), port
        )

    def describe(self, record: KeyframeLike, timeout_s: float = 60.0) -> SceneDescription:
        """Describes one keyframe; raises RequestError (with ``.detail``) when it cannot, also when
        no answer came within ``timeout_s`` (every attempt included: the request is then abandoned,
        and the server stops generating for it)."""
        scene: SceneDescription = self._engine.describe(str(record.frame_path), timeout_s)
        return scene

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
        """Describes every record with the slots busy (``concurrency`` at once on one server,
        default its slots; every server's slots with several), in input order; None where a frame
        failed (logged). ``progress_callback(done, total)`` after each frame (an exception it raises
        stops the batch and is raised here; stopping the engine from inside it is refused). A server
        that dies hands its frames in flight to the others (logged). ``last_summary`` then says what
        the batch did."""
        records = list(records)
        outcomes, deaths, summary = self._engine.describe_many(
            [str(r.frame_path) for r in records], concurrency, progress_callback
        )
        self.last_summary = summary
        for gpu, status, handed_over in deaths:
            log.warning(
                "GPU %d's server died (%s); %s", gpu, status,
                f"the other GPUs took its {handed_over} frame(s) in flight" if handed_over
                else "its frames' results say what became of them",
            )
        results: List[Optional[SceneDescription]] = []
        for record, outcome in zip(records, outcomes):
            if isinstance(outcome, RequestError):
                log.warning("frame %s not described: %s", record.frame_path, outcome.detail)
                results.append(None)
            else:
                results.append(outcome)
        return results


class TextEngine(_Server):
    """A text-only model's server (no mmproj), such as CineCut's subtitle stage, as a context
    manager; ``complete`` answers any JSON schema. ``options`` as for LlavaEngine."""

    def __init__(self, model_path: PathLike, port: Any = 8090, debug: bool = False, **options: Any) -> None:
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
            return self._engine.complete(schema, text, system, max_tokens, temperature, [], timeout_s)
        except InferenceError as e:
            log.warning("no answer: %s", e.detail)
            return None


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
    ``"all"``) runs a server per GPU, the frames going to whichever has a free slot, a dying
    server's frames handed to the others; ``servers_per_gpu=4`` (or ``"auto"``) and
    ``slots="auto"`` fill each GPU. Every option of LlavaEngine is taken."""
    records = list(records)
    if gpus is not None:
        options["gpus"] = gpus
    with LlavaEngine(model_path, mmproj_path, **options) as engine:
        scenes = engine.describe_frames(records, progress_callback=progress_callback)
    return list(zip(records, scenes))
