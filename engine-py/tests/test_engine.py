"""The Python package against the fake llama-server and the nvidia-smi shim: CineCut's plan's names and
behaviour, the machine-wide lock shared with `cinecut-infer`, threads, the stage, and Ctrl-C."""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import CINECUT_INFER, KeyframeRecord, alive, python_child, wait_gone

import cinecut_engine
from cinecut_engine import (
    GPU_LOCK,
    SCENE_DESCRIPTION_SCHEMA,
    VRAM_MINIMUM_MIB,
    InferenceError,
    LlavaEngine,
    SceneDescription,
    TextEngine,
    VramError,
    assert_vram_available,
    check_vram_free_mib,
    run_inference_stage,
    validate_scene_description,
)


def test_the_plans_imports_and_names():
    # The plan's own verification, with the package's name.
    from cinecut_engine import GPU_LOCK, LlavaEngine, SceneDescription, check_vram_free_mib  # noqa: F401
    from cinecut_engine import SCENE_DESCRIPTION_SCHEMA, validate_scene_description  # noqa: F401
    from cinecut_engine import VRAM_MINIMUM_MIB, assert_vram_available  # noqa: F401

    assert VRAM_MINIMUM_MIB == 6144
    assert [f for f in SceneDescription.__dataclass_fields__] == ["visual_content", "mood", "action", "setting"]
    assert SCENE_DESCRIPTION_SCHEMA["required"] == ["visual_content", "mood", "action", "setting"]
    assert SCENE_DESCRIPTION_SCHEMA["additionalProperties"] is False
    assert issubclass(VramError, cinecut_engine.CineCutEngineError)
    assert issubclass(InferenceError, cinecut_engine.CineCutEngineError)
    assert InferenceError("bad frame").detail == "bad frame"


def test_validation_names_the_field():
    ok = validate_scene_description({"visual_content": "a", "mood": "b", "action": "c", "setting": "d"})
    assert ok == SceneDescription("a", "b", "c", "d")
    with pytest.raises(ValueError, match="mood"):
        validate_scene_description({"visual_content": "a", "mood": 7, "action": "c", "setting": "d"})
    with pytest.raises(ValueError, match="setting"):
        validate_scene_description({"visual_content": "a", "mood": "b", "action": "c"})
    with pytest.raises(ValueError, match="extra"):
        validate_scene_description({"visual_content": "a", "mood": "b", "action": "c", "setting": "d", "extra": 1})


def test_vram_checks_use_the_engine_and_name_the_shortfall(scene, tmp_path, monkeypatch):
    assert check_vram_free_mib() == 79000
    assert_vram_available()
    monkeypatch.setenv("NVSMI_GPUS", "500")
    with pytest.raises(VramError) as info:
        check_vram_free_mib()
    assert info.value.detail.startswith("Only 500 MiB free VRAM, need at least 6144 MiB")
    with pytest.raises(VramError):
        with LlavaEngine(scene.model, scene.mmproj, port=0):
            pass
    assert scene.spawned_pids() == []
    # wait_for_vram: the memory comes back while it waits.
    free = tmp_path / "free"
    free.write_text("2000")
    monkeypatch.delenv("NVSMI_GPUS")
    monkeypatch.setenv("NVSMI_FREE_FILE", str(free))
    threading.Timer(0.2, lambda: free.write_text("79000")).start()
    assert cinecut_engine.wait_for_vram(poll_interval_s=0.05, timeout_s=20) == 79000
    free.write_text("2000")
    with pytest.raises(VramError, match="only 2000 MiB free after waiting") as info:
        cinecut_engine.wait_for_vram(poll_interval_s=0.05, timeout_s=0.2)
    assert (info.value.gpu, info.value.free_mib, info.value.required_mib) == (0, 2000, 6144)


def test_describe_frame_health_and_one_server_for_many_frames(scene):
    record = scene.frame("a.png", 40, 30, (10, 200, 10))
    with LlavaEngine(scene.model, scene.mmproj, port=0) as engine:
        with urllib.request.urlopen(engine.base_url + "/health") as reply:
            assert json.load(reply) == {"status": "ok"}
        pid = engine.pid
        scene_ = engine.describe_frame(record)
        assert isinstance(scene_, SceneDescription)
        assert "40x30" in scene_.visual_content and "green" in scene_.visual_content
        for field in ("mood", "action", "setting"):
            assert getattr(scene_, field)
        for _ in range(50):
            assert engine.describe_frame(record) == scene_
        assert engine.pid == pid
        assert len(scene.spawned_pids()) == 1
    wait_gone(pid)


def test_a_non_json_answer_or_a_missing_frame_gives_none(scene, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_LLAMA_RESPONSE", "not-json")
    record = scene.frame("a.png")
    with LlavaEngine(scene.model, scene.mmproj, port=0, retries=0) as engine:
        assert engine.describe_frame(record) is None
        with pytest.raises(InferenceError, match="no valid SceneDescription"):
            engine.describe(record)
        assert engine.describe_frame(KeyframeRecord(1.0, str(scene.root / "gone.png"), "x")) is None
    assert "not described" in caplog.text


def test_a_server_that_exits_during_load_raises_with_its_exit_code(scene, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_EXIT_DURING_LOAD", "3")
    with pytest.raises(InferenceError) as info:
        with LlavaEngine(scene.model, scene.mmproj, port=0):
            pass
    assert "exit code 3" in info.value.detail
    for pid in scene.spawned_pids():
        wait_gone(pid)


def test_an_exception_in_the_block_leaves_no_process_and_a_free_lock(scene):
    with pytest.raises(RuntimeError, match="the stage broke"):
        with LlavaEngine(scene.model, scene.mmproj, port=0) as engine:
            pid = engine.pid
            assert GPU_LOCK.locked()
            raise RuntimeError("the stage broke")
    wait_gone(pid)
    assert not GPU_LOCK.locked()


def test_gpu_lock_keeps_a_cinecut_infer_in_another_process_waiting(scene):
    frame = scene.frame("a.png")
    env = dict(os.environ)
    with GPU_LOCK:
        cli = subprocess.Popen(
            [CINECUT_INFER, "describe", "--model", str(scene.model), "--mmproj", str(scene.mmproj),
             "--port", "0", frame.frame_path],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # It says who holds the lock, and waits: no server starts while we hold it.
        first = cli.stderr.readline()
        assert "waiting for GPU 0: its lock" in first and f"is held by pid {os.getpid()}" in first, first
        assert cli.poll() is None, "cinecut-infer ran while GPU_LOCK was held"
        assert scene.spawned_pids() == []
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 0, err
    assert json.loads(out)["scene"]["mood"]


def test_a_cinecut_infer_holding_the_gpu_keeps_gpu_lock_off(scene):
    frame = scene.frame("a.png")
    env = dict(os.environ, FAKE_LLAMA_LOAD_MS="60000")
    cli = subprocess.Popen(
        [CINECUT_INFER, "describe", "--model", str(scene.model), "--mmproj", str(scene.mmproj),
         "--port", "0", frame.frame_path],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        scene.wait_for_event("listening")
        assert GPU_LOCK.locked()
        assert GPU_LOCK.acquire(timeout=0.2) is False
    finally:
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=30) == 130
    assert GPU_LOCK.acquire(timeout=10)
    GPU_LOCK.release()


def test_threads_describe_at_once(scene):
    records = [scene.frame(f"f{i}.png", 20 + i, 20, (i * 20, 90, 90)) for i in range(8)]
    results = [None] * 8
    with LlavaEngine(scene.model, scene.mmproj, port=0, slots=4) as engine:
        def work(i):
            results[i] = engine.describe_frame(records[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, result in enumerate(results):
        assert result is not None and f"{20 + i}x20" in result.visual_content


def test_run_inference_stage_keeps_order_and_puts_none_where_a_frame_is_bad(scene):
    good = [scene.frame(f"g{i}.png", 10 + i, 10) for i in range(5)]
    bad = KeyframeRecord(2.0, str(scene.root / "missing.png"), "x")
    not_image = scene.root / "notes.png"
    not_image.write_text("not an image")
    broken = KeyframeRecord(3.0, str(not_image), "x")
    records = [good[0], bad, good[1], broken, *good[2:]]
    seen = []
    results = run_inference_stage(
        records, scene.model, scene.mmproj, progress_callback=lambda d, t: seen.append((d, t)), port=0
    )
    assert [r for r, _ in results] == records
    assert [s is None for _, s in results] == [False, True, False, True, False, False, False]
    assert f"{10}x10" in results[0][1].visual_content
    assert seen[-1] == (7, 7) and len(seen) == 7


def test_a_text_engine_answers_any_schema(scene):
    anchors = {
        "type": "object",
        "properties": {"begin_t": {"type": "number"}, "escalation_t": {"type": "number"}, "climax_t": {"type": "number"}},
        "required": ["begin_t", "escalation_t", "climax_t"],
        "additionalProperties": False,
    }
    with TextEngine(scene.model, port=0) as engine:
        answer = engine.complete(anchors, "[12.3s] Who's there?", system="Find the anchors.")
        assert set(answer) == {"begin_t", "escalation_t", "climax_t"}
        args = next(e for e in scene.server_events() if e["event"] == "spawned")["args"]
        assert "--mmproj" not in args


CTRL_C_SCRIPT = r"""
import sys, cinecut_engine
try:
    with cinecut_engine.LlavaEngine(sys.argv[1], sys.argv[2], port=0):
        print("started", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(7)
"""


def test_ctrl_c_during_a_slow_start_raises_keyboard_interrupt_at_once(scene, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_LOAD_MS", "60000")
    with python_child(CTRL_C_SCRIPT, scene.model, scene.mmproj) as child:
        scene.wait_for_event("listening")
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
        took = time.monotonic() - sent
    assert child.returncode == 7 and "interrupted" in out, out
    assert took < 1.0, f"KeyboardInterrupt took {took:.2f} s"
    for pid in scene.spawned_pids():
        wait_gone(pid)
    assert not GPU_LOCK.locked()


def test_ctrl_c_while_waiting_for_the_lock(scene):
    script = r"""
import sys, cinecut_engine
try:
    print("ready", flush=True)
    cinecut_engine.GPU_LOCK.acquire()
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""
    with GPU_LOCK, python_child(script) as child:
        # Without interruptible waits the child would block here for ever (and the test time out).
        assert child.stdout.readline() == "ready\n"
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
        assert "interrupted" in out and time.monotonic() - sent < 1.0


def test_ctrl_c_during_a_request_raises_at_once_and_the_exit_stops_the_server(scene, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_LATENCY_MS", "60000")
    frame = scene.frame("a.png")
    script = r"""
import sys, time, dataclasses, cinecut_engine
@dataclasses.dataclass
class R:
    timestamp_s: float
    frame_path: str
    source: str
with cinecut_engine.LlavaEngine(sys.argv[1], sys.argv[2], port=0, stop_grace_s=0.5) as engine:
    try:
        engine.describe_frame(R(1.0, sys.argv[3], "x"))
    except KeyboardInterrupt:
        print("interrupted", time.monotonic(), flush=True)
print("exited", time.monotonic(), flush=True)
"""
    with python_child(script, scene.model, scene.mmproj, frame.frame_path) as child:
        scene.wait_for_event("request_start")
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=30)
    lines = dict(line.split() for line in out.splitlines())
    assert float(lines["interrupted"]) - sent < 1.0, out
    # The request in flight was the server's to end: SIGTERM, then SIGKILL after the grace.
    assert float(lines["exited"]) - sent < 5.0, out
    for pid in scene.spawned_pids():
        wait_gone(pid)
    assert not GPU_LOCK.locked()


def test_gpu_lock_behaves_as_threading_lock_and_locked_never_takes_it(scene):
    lock = cinecut_engine.gpu_lock(5)
    assert lock.acquire(timeout=0) is True  # free: taken at once, as threading.Lock
    assert lock.locked()
    assert lock.acquire(blocking=0) is False  # any truth value
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()
    with pytest.raises(ValueError, match="non-blocking"):
        lock.acquire(False, timeout=1)
    # locked() reads the lock's state without taking it: another process's try never fails on it.
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            lock.locked()

    poller = threading.Thread(target=poll)
    poller.start()
    path = scene.root / "locks" / "cinecut-gpu-5.lock"
    try:
        for _ in range(100):
            assert subprocess.run(["flock", "-n", str(path), "true"]).returncode == 0
    finally:
        stop.set()
        poller.join()


def test_misuse_and_bad_values_raise_instead_of_passing_as_failures(scene):
    with pytest.raises(ValueError, match="stop_grace_s"):
        LlavaEngine(scene.model, scene.mmproj, stop_grace_s=float("inf"))
    with pytest.raises(ValueError, match="vram_recovery_timeout_s"):
        LlavaEngine(scene.model, scene.mmproj, vram_recovery_timeout_s=float("nan"))
    with pytest.raises(ValueError, match="unknown option"):
        LlavaEngine(scene.model, scene.mmproj, slot=2)
    engine = LlavaEngine(scene.model, scene.mmproj, port=0)
    record = scene.frame("a.png")
    with pytest.raises(RuntimeError, match="not running"):
        engine.describe_frame(record)
    with TextEngine(scene.model, port=0) as text:
        with pytest.raises(ValueError, match="temperature"):
            text.complete({"type": "object"}, "x", temperature=9)
    for bad in [{"visual_content": "a", "mood": float("nan"), "action": "c", "setting": "d"},
                {"visual_content": "a", "mood": "\ud800", "action": "c", "setting": "d"}]:
        with pytest.raises(cinecut_engine.SceneValidationError, match="mood|JSON"):
            validate_scene_description(bad)
