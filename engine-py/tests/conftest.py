"""Fixtures: the repository's fake llama-server and nvidia-smi shim (built by `cargo xtask ci`), a
private GPU-lock folder, GGUF model headers and PNG frames written here, and a check that no server
is left behind by any test."""

import contextlib
import dataclasses
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def binary(env: str, name: str) -> str:
    path = os.environ.get(env) or str(ROOT / "target" / "debug" / name)
    if not Path(path).is_file():
        pytest.exit(f"{path} is missing: run `cargo build --workspace` first (or set {env})")
    return path


# CI runs the suite against the wheel, installed into an environment with no Rust toolchain: the
# package must come from there, and nothing may need cargo or rustc.
if os.environ.get("CINECUT_EXPECT_INSTALLED"):
    import shutil

    import cinecut_engine

    assert "site-packages" in cinecut_engine.__file__, cinecut_engine.__file__
    assert shutil.which("cargo") is None and shutil.which("rustc") is None, os.environ["PATH"]

FAKE_SERVER = binary("FAKE_SERVER", "fake-llama-server")
NVSMI_SHIM = binary("NVSMI_SHIM", "nvsmi-shim")
CINECUT_INFER = binary("CINECUT_INFER", "cinecut-infer")


@dataclasses.dataclass
class KeyframeRecord:
    """CineCut's record, as its keyframe stage writes it."""

    timestamp_s: float
    frame_path: str
    source: str


def write_gguf(path: Path, keys) -> Path:
    """A GGUF header of `keys`: strings, and whole numbers (uint32)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(keys))
    for key, value in keys:
        k = key.encode()
        out += struct.pack("<Q", len(k)) + k
        if isinstance(value, int):
            out += struct.pack("<II", 4, value)
        else:
            v = value.encode()
            out += struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v
    path.write_bytes(out)
    return path


#: LLaVA-1.5-7B's KV numbers: 1024 MiB per slot of 2048 tokens (what `auto` reads).
LLAVA_7B_SHAPE = [
    ("general.architecture", "llama"),
    ("llama.block_count", 32),
    ("llama.embedding_length", 4096),
    ("llama.attention.head_count", 32),
    ("llama.attention.head_count_kv", 32),
]


def write_png(path: Path, width: int, height: int, rgb) -> Path:
    """A PNG of one colour, written without any imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(rgb) * width
    data = zlib.compress(row * height)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


class Scene:
    """A scratch folder: models, frames, the fake's events, and helpers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = write_gguf(root / "ggml-model-q4_k.gguf", [("general.architecture", "llama")])
        self.mmproj = write_gguf(
            root / "mmproj-model-f16.gguf",
            [("general.architecture", "clip"), ("clip.projector_type", "mlp")],
        )
        self.events = root / "events.jsonl"

    def frame(self, name: str, width: int = 32, height: int = 24, rgb=(200, 30, 30)) -> KeyframeRecord:
        path = write_png(self.root / name, width, height, rgb)
        return KeyframeRecord(timestamp_s=1.0, frame_path=str(path), source="test")

    def server_events(self):
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]

    def spawned_pids(self):
        return [e["pid"] for e in self.server_events() if e["event"] == "spawned"]

    def wait_for_event(self, name: str, limit_s: float = 20.0) -> None:
        deadline = time.monotonic() + limit_s
        while not any(e["event"] == name for e in self.server_events()):
            assert time.monotonic() < deadline, f"the server never reported {name}"
            time.sleep(0.005)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.005)


@pytest.fixture
def scene(tmp_path, monkeypatch) -> Scene:
    """The fakes in the environment, a private lock folder, and after the test: every server it
    started is gone and GPU 0's lock is free."""
    monkeypatch.setenv("LLAMA_SERVER", FAKE_SERVER)
    monkeypatch.setenv("NVIDIA_SMI", NVSMI_SHIM)
    monkeypatch.setenv("CINECUT_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("FAKE_LLAMA_EVENTS", str(tmp_path / "events.jsonl"))
    s = Scene(tmp_path)
    yield s
    for pid in s.spawned_pids():
        wait_gone(pid)
    import cinecut_engine

    assert cinecut_engine.GPU_LOCK.acquire(blocking=False), "GPU 0's lock is still held"
    cinecut_engine.GPU_LOCK.release()


# Python keeps an ignored SIGINT ignored, and a shell without job control starts background commands
# with SIGINT ignored: a CI started that way would never interrupt a child. The children start as a
# terminal starts Python instead, with Ctrl-C raising KeyboardInterrupt.
INTERRUPTIBLE = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


@contextlib.contextmanager
def python_child(script: str, *args):
    """Runs `script` in a Python child (stdout piped, text) in which SIGINT raises KeyboardInterrupt;
    the child is killed and reaped when the block ends, should a failed test leave it running."""
    command = [sys.executable, "-c", INTERRUPTIBLE + script, *map(str, args)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


def run_cli(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([CINECUT_INFER, *args], env=env, **kwargs)
