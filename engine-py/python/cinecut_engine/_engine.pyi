"""Type stubs of the extension module (see the package's docstrings for behaviour)."""

from typing import Any, Callable, Dict, List, Optional, Tuple

VRAM_MINIMUM_MIB: int
DEFAULT_PORT: int

class EngineFailure(Exception):
    detail: str

class VramError(EngineFailure):
    gpu: Optional[int]
    free_mib: Optional[int]
    required_mib: Optional[int]

class InferenceError(EngineFailure): ...

class StartError(InferenceError):
    exit_code: Optional[int]
    signal: Optional[int]
    output_tail: Optional[str]

class RequestError(InferenceError):
    kind: Optional[str]
    subject: Optional[str]
    status: Optional[int]
    exit_code: Optional[int]
    signal: Optional[int]

def vram_free_mib(gpu: int = 0, min_mib: int = 0) -> int: ...
def wait_for_vram(min_free_mib: int, poll_interval_s: float, timeout_s: float, gpu: int = 0) -> int: ...
def scene_violations(value_json: str) -> List[str]: ...
def scene_schema_json() -> str: ...

class GpuLock:
    def __init__(self, gpu: int) -> None: ...
    @property
    def gpu(self) -> int: ...
    def acquire(self, blocking: bool = True, timeout: float = -1.0) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...

class Engine:
    def __init__(
        self,
        model: str,
        mmproj: Optional[str] = None,
        port: int = 8089,
        debug: bool = False,
        options: Optional[Dict[str, Any]] = None,
    ) -> None: ...
    def start(self, held: List[int] = ...) -> None: ...
    def stop(self) -> None: ...
    def swap(self, next: "Engine") -> None: ...
    @property
    def running(self) -> bool: ...
    @property
    def base_url(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def pids(self) -> List[int]: ...
    @property
    def gpus(self) -> List[int]: ...
    @property
    def api_key(self) -> str: ...
    @property
    def left_out(self) -> List[Tuple[str, str]]: ...
    def describe(self, frame_path: str, timeout_s: float = 60.0) -> str: ...
    def describe_many(
        self,
        frame_paths: List[str],
        concurrency: int = 1,
        progress: Optional[Callable[[int, int], Any]] = None,
    ) -> Tuple[List[Tuple[Optional[str], Optional[str]]], List[Tuple[int, str, int]], str]: ...
    def complete(
        self,
        schema_json: str,
        text: str,
        system: Optional[str] = None,
        max_tokens: int = 128,
        temperature: float = 0.1,
        images: List[str] = ...,
        timeout_s: float = 60.0,
    ) -> str: ...
    def time_describe(self, frame_path: str, n: int) -> float: ...
