"""CineCut's inference engine from Python: the seed's ``cinecut.inference`` API, run by the Rust engine.

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
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

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
    "run_inference_stage",
]

log = logging.getLogger("cinecut_engine")

#: Minimum free VRAM in MiB for LLaVA 1.5 7B Q4 and its context (the seed's 6 GB).
VRAM_MINIMUM_MIB: int = _engine.VRAM_MINIMUM_MIB

#: The base of the engine's errors; ``.detail`` says what failed, with the value and the fix.
CineCutEngineError = _engine.EngineFailure
#: Free VRAM could not be read, or is below the minimum.
VramError = _engine.VramError
#: Starting, using or stopping llama-server failed, or an answer was unusable.
InferenceError = _engine.InferenceError


def _detail(self: BaseException) -> str:
    return str(self.args[0]) if self.args else ""


CineCutEngineError.detail = property(_detail, doc="What failed, with the value and the fix.")

PathLike = Union[str, Path]


@dataclasses.dataclass(frozen=True)
class SceneDescription:
    """A keyframe's description, as the vision model gives it."""

    visual_content: str
    mood: str
    action: str
    setting: str


#: The JSON schema of SceneDescription, exactly as the seed gives it (sent to llama-server).
SCENE_DESCRIPTION_SCHEMA: dict = json.loads(_engine.scene_schema_json())

_FIELDS = tuple(f.name for f in dataclasses.fields(SceneDescription))


class SceneValidationError(ValueError):
    """A value that is not a SceneDescription; the message names each field that is wrong."""


def validate_scene_description(data: dict) -> SceneDescription:
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
    when ``timeout_s`` passes, or at once when VRAM cannot be read.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        free = _engine.vram_free_mib(gpu, 0)
        if free >= min_free_mib:
            return free
        left = deadline - time.monotonic()
        if left <= 0:
            raise VramError(
                f"Only {free} MiB free VRAM after waiting {timeout_s} s, need at least "
                f"{min_free_mib} MiB (GPU {gpu}) — check nvidia-smi for what holds the memory"
            )
        time.sleep(min(poll_interval_s, left))


class GpuLock:
    """The engine's per-GPU lock, machine-wide (every process of every user), with
    ``threading.Lock``'s methods. Held by a Python stage, it keeps a LlavaEngine in this process and a
    ``cinecut-infer`` in another off the GPU, and the other way round. Not reentrant.
    """

    def __init__(self, gpu: int = 0) -> None:
        self._lock = _engine.GpuLock(gpu)

    @property
    def gpu(self) -> int:
        """The GPU (nvidia-smi index)."""
        return self._lock.gpu

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Takes the lock: waits (at most ``timeout`` seconds unless -1), or tries once
        (``blocking=False``). True when taken. Ctrl-C interrupts the wait."""
        return self._lock.acquire(blocking, float(timeout))

    def release(self) -> None:
        """Releases the lock; RuntimeError if this object does not hold it."""
        self._lock.release()

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


_LOCKS: dict = {}


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


class _Server:
    """What LlavaEngine and TextEngine share: the engine's lifecycle as a context manager."""

    def __init__(self, engine: Any, port: int) -> None:
        self._engine = engine
        self._port = port

    def __enter__(self):
        self._engine.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._engine.stop()
        except InferenceError as e:
            log.warning("llama-server had died before the stop: %s", e.detail)

    @property
    def port(self) -> int:
        """The port the server listens on (the one chosen, for port 0)."""
        return self._engine.port if self._engine.running else self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's pid (while running)."""
        return self._engine.pid

    @property
    def api_key(self) -> str:
        """The server's API key: every endpoint but /health needs ``Authorization: Bearer KEY``."""
        return self._engine.api_key


class LlavaEngine(_Server):
    """The vision model's server as a context manager: ``__enter__`` checks VRAM, takes the GPU lock
    and starts llama-server; ``__exit__`` stops it, waits for VRAM and releases the lock, also when
    the block raises.

    ``options``: slots, ctx_size, gpu, gpu_layers, min_vram_mib, startup_timeout_s,
    request_timeout_s, retries, prompt, max_tokens, temperature, server_bin, nvidia_smi,
    server_args, vram_recovery_timeout_s.
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
        self._slots = int(options.get("slots", 1))
        super().__init__(
            _engine.Engine(str(model_path), str(mmproj_path), port, debug, options), port
        )

    def describe(self, record: KeyframeLike, timeout_s: float = 60.0) -> SceneDescription:
        """Describes one keyframe; raises InferenceError (with ``.detail``) when it cannot."""
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
        """Describes every record, ``concurrency`` at once (default: the slots), in input order;
        None where a frame failed (logged). ``progress_callback(done, total)`` after each frame."""
        records = list(records)
        pairs = self._engine.describe_many(
            [str(r.frame_path) for r in records], concurrency or self._slots, progress_callback
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
        schema: dict,
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
    records: Iterable[KeyframeLike],
    model_path: PathLike,
    mmproj_path: PathLike,
    progress_callback: Optional[Callable[[int, int], Any]] = None,
    **options: Any,
) -> List[Tuple[KeyframeLike, Optional[SceneDescription]]]:
    """CineCut's stage 4: every record with its description (None where a frame is missing or
    bad), in input order; ``progress_callback(done, total)`` after each frame."""
    records = list(records)
    with LlavaEngine(model_path, mmproj_path, **options) as engine:
        scenes = engine.describe_frames(records, progress_callback=progress_callback)
    return list(zip(records, scenes))
