"""The values and exceptions that cross between the engine and Python: plain classes with typed
attributes, made by the engine (``_engine``) and read by callers. Nothing here imports the engine."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class SceneDescription:
    """A keyframe's description, as the vision model gives it."""

    visual_content: str
    mood: str
    action: str
    setting: str


class CineCutEngineError(Exception):
    """The base of the engine's errors. ``detail`` says what failed, with the value and the fix
    (settings named as this package's keywords: ``min_vram_mib=``)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        #: What failed, with the value and the fix.
        self.detail: str = detail

    def __reduce__(self) -> Tuple[Any, Tuple[str], Dict[str, Any]]:
        # Pickled whole (a Ray worker's error crosses processes): the message and every attribute.
        return (type(self), (self.detail,), self.__dict__)


class VramError(CineCutEngineError):
    """Free VRAM could not be read, or is below what the engine needs."""

    def __init__(
        self,
        detail: str,
        *,
        gpu: Optional[int] = None,
        free_mib: Optional[int] = None,
        required_mib: Optional[int] = None,
    ) -> None:
        super().__init__(detail)
        #: The GPU (nvidia-smi index), where one was read.
        self.gpu: Optional[int] = gpu
        #: Its free memory, where it was read.
        self.free_mib: Optional[int] = free_mib
        #: What the engine needed.
        self.required_mib: Optional[int] = required_mib


class InferenceError(CineCutEngineError):
    """Starting, using or stopping llama-server failed, or an answer was unusable: the base of
    StartError and RequestError."""


class StartError(InferenceError):
    """llama-server did not start (whatever was started was stopped, the lock released)."""

    def __init__(
        self,
        detail: str,
        *,
        exit_code: Optional[int] = None,
        signal: Optional[int] = None,
        output_tail: Optional[str] = None,
    ) -> None:
        super().__init__(detail)
        #: The server's exit code, where it exited while loading.
        self.exit_code: Optional[int] = exit_code
        #: The signal that ended it, where one did.
        self.signal: Optional[int] = signal
        #: Its last output lines, where it printed any.
        self.output_tail: Optional[str] = output_tail


class RequestError(InferenceError):
    """A request was not answered."""

    def __init__(
        self,
        detail: str,
        *,
        kind: Optional[str] = None,
        subject: Optional[str] = None,
        status: Optional[int] = None,
        exit_code: Optional[int] = None,
        signal: Optional[int] = None,
    ) -> None:
        super().__init__(detail)
        #: What went wrong, in one word: server_died, bad_image, invalid_prompt, http, timeout,
        #: transport, invalid_output, context_exhausted, not_attempted, cancelled.
        self.kind: Optional[str] = kind
        #: The frame or request it was about.
        self.subject: Optional[str] = subject
        #: The HTTP status, for ``http``.
        self.status: Optional[int] = status
        #: A dead server's exit code.
        self.exit_code: Optional[int] = exit_code
        #: The signal that ended a dead server.
        self.signal: Optional[int] = signal
