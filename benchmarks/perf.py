"""BLoB's cost against plain LoRA: step time, peak memory, prediction, Pyro's share, a small sweep.

One command; every ratio is measured inside one process run (interleaved repeats after warm-up,
medians), so it holds on a shared, noisy machine::

    python benchmarks/perf.py                                # everything (CPU protocol: MiniLM-L6, B=16, T=128/256)
    python benchmarks/perf.py --sections step,predict        # some sections (results merge into the same JSON)
    python benchmarks/perf.py --quick                        # smoke run in seconds (tiny sizes, 2 repeats)
    python benchmarks/perf.py --device cuda                  # on a GPU: torch.cuda.max_memory_allocated for memory

Writes ``benchmarks/results/perf-<device>.json`` (every number, the command, versions) and
``perf-<device>.md`` (the tables of benchmarks/README.md). A section run again replaces its own
entry and keeps the others.

Configurations (same backbone, synthetic fixed-length batch, LoRA r=8 on query/value):

- ``lora_torch``  plain PEFT LoRA in pure PyTorch (no Pyro): forward, cross-entropy, backward, AdamW — the floor;
- ``mle``         the same LoRA trained through blob_pyro (Pyro SVI, AutoDelta, KL weight 0): ``--method mle``;
- ``blob``        BLoB (Bayesian B factor, mean-field guide, Flipout signs per token, the default);
- ``blob_seq``    BLoB with Flipout signs per sequence (``--flipout-per sequence``);
- ``blob_torch``  BLoB's exact computation written in plain PyTorch (sampling, Flipout, closed-form KL, one
  AdamW): ``blob`` minus this is the time spent in Pyro's machinery (traces, replay, param store,
  per-parameter optimisers) and blob_pyro's bookkeeping.

Sections: ``step`` (step time), ``memory`` (peak memory; each configuration in a fresh subprocess),
``predict`` (S=10 sequential and sample-batched vs one posterior-mean pass), ``overhead`` (Pyro's fixed
cost per step at a tiny size), ``sweep`` (batch size, sequence length, number of LoRA layers).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SECTIONS = ("step", "memory", "predict", "overhead", "layer", "sweep")
SETUPS = ("lora_torch", "mle", "blob", "blob_seq", "blob_torch")
STEP_SETUPS = ("lora_torch", "mle", "blob", "blob_seq")
NUM_DATA = 640  # N for the likelihood scale and KL weight (WinoGrande-S size); does not change the cost


# ---- Pyro param stores, one per configuration -----------------------------------------------------
class StoreSlot:
    """A private Pyro param store: several Pyro models live in one process without sharing parameters.

    Swaps the contents of the global ``ParamStoreDict`` (its three dicts) in and out; a benchmark-only
    device, outside any timed region.
    """

    def __init__(self):
        self.dicts = ({}, {}, {})

    @contextlib.contextmanager
    def active(self):
        store = pyro.get_param_store()
        saved = (store._params, store._param_to_name, store._constraints)
        store._params, store._param_to_name, store._constraints = self.dicts
        try:
            yield
        finally:
            self.dicts = (store._params, store._param_to_name, store._constraints)
            store._params, store._param_to_name, store._constraints = saved


class Setup:
    """One configuration: ``step(batch)`` (a full training step) and, for Pyro ones, model and guide."""

    def __init__(self, name, step, slot=None, model=None, guide=None, modules=()):
        self.name, self._step, self.slot, self.model, self.guide = name, step, slot, model, guide
        self.modules = list(modules)

    def context(self):
        return self.slot.active() if self.slot is not None else contextlib.nullcontext()

    def step(self, batch):
        with self.context():
            return self._step(batch)

    def persistent_storages(self) -> set[int]:
        """Storages that outlive a step (weights, buffers, variational parameters)."""
        out = set()
        for module in self.modules:
            for t in list(module.parameters()) + list(module.buffers()):
                out.add(t.untyped_storage().data_ptr())
        if self.slot is not None:
            for t in self.slot.dicts[0].values():
                out.add(t.untyped_storage().data_ptr())
        return out


def targets_for(num_layers: int | None, total: int = 6) -> list[str] | None:
    """LoRA on query and value of the last ``num_layers // 2`` encoder layers (None: all, the default)."""
    if num_layers is None:
        return None
    per = num_layers // 2
    return [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(total - per, total) for m in ("query", "value")]


def build_setup(kind: str, *, model: str, seq_len: int, device: str, lora_layers: int | None = None,
                lr: float = 1e-4, seed: int = 0) -> Setup:
    from blob_pyro.config import TrainConfig
    from blob_pyro.infer import make_stepper
    from blob_pyro.runs import build

    torch.manual_seed(seed)
    if kind == "lora_torch":
        return _lora_torch(model, seq_len, device, lora_layers, lr)
    method = "mle" if kind == "mle" else "blob"
    cfg = TrainConfig(model=model, dataset="winogrande_s", head="sequence_classification", method=method,
                      max_length=seq_len, device=device, target_modules=targets_for(lora_layers),
                      flipout_per="sequence" if kind == "blob_seq" else "token", seed=seed)
    slot = StoreSlot()
    with slot.active():
        run = build(cfg, with_data=False)
        run.model.num_data = NUM_DATA
        cfg = run.config
        run.model.network.eval()
        if kind == "blob_torch":
            step = _blob_torch_step(run.model, run.guide, lr, cfg.flipout_per)
        else:
            stepper = make_stepper(run.model, run.guide, max_steps=10**9, lr=lr, use_flipout=cfg.flipout,
                                   flipout_per=cfg.flipout_per, elbo=cfg.elbo)
            weight = 0.0 if kind == "mle" else 1.0 / NUM_DATA

            def step(batch):
                return stepper.step(batch, weight, NUM_DATA)["loss"]
    return Setup(kind, step, slot, run.model, run.guide, modules=[run.model.network])


def _lora_torch(model: str, seq_len: int, device: str, lora_layers, lr: float) -> Setup:
    from peft import LoraConfig, get_peft_model

    from blob_pyro.backbone import default_targets, load_backbone

    hf, _, _ = load_backbone(model, num_classes=2, head="sequence_classification")
    targets = targets_for(lora_layers) or default_targets(hf.config)
    net = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                        modules_to_save=["classifier"])).to(device).eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)

    def step(batch):
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits.float()
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Setup("lora_torch", step, modules=[net])


def _blob_torch_step(model, guide, lr: float, per: str):
    """BLoB's step without Pyro: draw, Flipout, NLL + KL/N, backward, one AdamW over every parameter."""
    from blob_pyro.guides import deep_getattr
    from blob_pyro.lora import bind_values
    from blob_pyro.reparam import FlipoutMessenger

    with torch.no_grad():
        guide(model.example_batch())  # registers the guide's parameters
    locs = {s.name: deep_getattr(guide.loc, s.name).unconstrained() for s in model.sites}
    rhos = {s.name: deep_getattr(guide.rho, s.name).unconstrained() for s in model.sites}
    net_params = [p for p in model.network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(list(locs.values()) + list(rhos.values()) + net_params, lr=lr)
    beta = model.prior.scale

    def step(batch):
        handler = FlipoutMessenger(per)
        with handler:
            draws, kl = {}, 0.0
            for site in model.sites:
                loc, std = locs[site.name], rhos[site.name].square()
                value = loc + std * torch.randn_like(std)
                handler.register(value, loc)
                draws[site.name] = value
                kl = kl + (torch.log(beta / std) + (std**2 + loc**2) / (2 * beta**2) - 0.5).sum()
            with bind_values(model.sites, draws):
                logits = model.head.logits(model.network, batch)
            loss = F.cross_entropy(logits, batch["labels"]) + kl / NUM_DATA
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---- inputs and clocks ------------------------------------------------------------------------------
def synthetic_batch(batch_size: int, seq_len: int, device, seed: int = 0, vocab: int = 30522) -> dict:
    """A fixed-length batch (no padding), so the sequence length is exactly ``seq_len``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab - 1, (batch_size, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
           "labels": torch.randint(0, 2, (batch_size,), generator=g), "index": torch.arange(batch_size)}
    return {k: v.to(device) for k, v in out.items()}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCK = {"name": "wall"}  # "cpu" (process CPU time) or "wall"; see --clock


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def interleave(fns: dict, *, repeats: int, warmup: int, device, seed: int = 0) -> dict[str, list[float]]:
    """Run every function ``warmup`` times, then ``repeats`` rounds in a fresh random order each round.

    Returns seconds per call by the clock in ``CLOCK`` (CPU time on a shared CPU: time spent waiting for a
    core that another process holds is not counted); both clocks are kept in ``interleave.last``.
    """
    rng = random.Random(seed)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            w, c = timed(fns[name], device)
            wall[name].append(w)
            cpu[name].append(c)
    interleave.last = {"wall_ms": {k: [1000 * t for t in v] for k, v in wall.items()},
                       "cpu_ms": {k: [1000 * t for t in v] for k, v in cpu.items()}}
    return cpu if CLOCK["name"] == "cpu" else wall


def med_ms(values) -> float:
    return 1000 * statistics.median(values)


def paired(times: dict, a: str, b: str) -> dict:
    """Median and quartiles over rounds of time[a] / time[b] *within* each round (a and b ran seconds apart,
    so a machine that slows down between rounds cancels out)."""
    ratios = sorted(x / y for x, y in zip(times[a], times[b]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "n": len(ratios)}


# ---- memory -------------------------------------------------------------------------------------------
def saved_for_backward_bytes(setup: Setup, batch) -> int:
    """Bytes of tensors autograd keeps for backward in one step, not counting weights and parameters."""
    persistent = setup.persistent_storages()
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in persistent and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        setup.step(batch)
    return sum(seen.values())


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _trim_heap():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def memory_child(args) -> dict:
    """Run in a fresh process: peak memory of ``args.child_memory``'s steps above the warmed-up baseline."""
    device = args.device
    setup = build_setup(args.child_memory, model=args.model, seq_len=args.seq_len, device=device,
                        lora_layers=args.lora_layers)
    batch = synthetic_batch(args.batch, args.seq_len, device)
    for _ in range(2):
        setup.step(batch)
    out = {"setup": setup.name, "seq_len": args.seq_len, "batch": args.batch}
    out["saved_for_backward_mb"] = saved_for_backward_bytes(setup, batch) / 2**20
    gc.collect()
    _trim_heap()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            setup.step(batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(kind="cuda_max_memory_allocated", base_mb=base / 2**20, peak_mb=peak / 2**20)
    else:
        base = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        for _ in range(2):
            setup.step(batch)
        peak = _rss_kb("VmHWM")
        out.update(kind="rss", base_mb=base / 1024, peak_mb=peak / 1024)
    out["step_mb"] = out["peak_mb"] - out["base_mb"]
    return out


def run_memory_child(kind: str, args, seq_len: int, lora_layers=None) -> dict:
    # the child must import what this process imports: the repo first, then any PYTHONPATH the caller set
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",  # big blocks go back to the OS when freed
               OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=path)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", kind, "--seq-len", str(seq_len),
           "--batch", str(args.batch), "--device", args.device, "--model", args.model]
    if lora_layers is not None:
        cmd += ["--lora-layers", str(lora_layers)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- sections -----------------------------------------------------------------------------------------
def section_step(args, log) -> dict:
    out = {}
    for seq_len in args.seq_lens:
        setups = {k: build_setup(k, model=args.model, seq_len=seq_len, device=args.device) for k in STEP_SETUPS}
        batch = synthetic_batch(args.batch, seq_len, args.device)
        fns = {k: (lambda s=s: s.step(batch)) for k, s in setups.items()}
        times = interleave(fns, repeats=args.repeats, warmup=args.warmup, device=args.device)
        ms = {k: med_ms(v) for k, v in times.items()}
        row = {"batch": args.batch, "seq_len": seq_len, "median_ms": ms, "clock": CLOCK["name"], **interleave.last,
               "paired": {f"{a}/{b}": paired(times, a, b) for a, b in (
                   ("blob", "mle"), ("blob", "lora_torch"), ("blob_seq", "mle"), ("mle", "lora_torch"))}}
        row["blob_over_mle"] = row["paired"]["blob/mle"]["median"]
        row["blob_over_lora_torch"] = row["paired"]["blob/lora_torch"]["median"]
        out[str(seq_len)] = row
        log(f"step T={seq_len}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
            + f"; blob/mle {row['blob_over_mle']:.3f}, blob/lora_torch {row['blob_over_lora_torch']:.3f}")
        del setups
        gc.collect()
    return out


def section_memory(args, log) -> dict:
    out = {}
    for seq_len in args.seq_lens:
        rows = {k: run_memory_child(k, args, seq_len) for k in ("lora_torch", "mle", "blob", "blob_seq")}
        for k, r in rows.items():
            r["peak_over_mle"] = r["peak_mb"] / rows["mle"]["peak_mb"]
            r["step_over_mle"] = r["step_mb"] / rows["mle"]["step_mb"] if rows["mle"]["step_mb"] > 0 else None
            r["saved_over_mle"] = r["saved_for_backward_mb"] / rows["mle"]["saved_for_backward_mb"]
        out[str(seq_len)] = rows
        log(f"memory T={seq_len}: " + ", ".join(f"{k} peak {r['peak_mb']:.0f} MB (+{r['step_mb']:.0f}), saved "
                                                f"{r['saved_for_backward_mb']:.1f} MB" for k, r in rows.items()))
    return out


def section_predict(args, log) -> dict:
    from blob_pyro.predictive import posterior_logits

    seq_len = args.seq_lens[0]
    blob = build_setup("blob", model=args.model, seq_len=seq_len, device=args.device)
    lora = build_setup("lora_torch", model=args.model, seq_len=seq_len, device=args.device)
    net = lora.modules[0]
    batch = synthetic_batch(args.batch, seq_len, args.device)
    s = args.num_samples

    def post(**kw):
        with blob.context():
            posterior_logits(blob.model, blob.guide, batch, **kw)

    def lora_forward():
        with torch.no_grad():
            net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])

    fns = {"lora_forward": lora_forward, "mean": lambda: post(num_samples=0),
           "sequential": lambda: post(num_samples=s), "batched": lambda: post(num_samples=s, sample_batched=True)}
    times = interleave(fns, repeats=args.repeats, warmup=args.warmup, device=args.device)
    ms = {k: med_ms(v) for k, v in times.items()}
    pairs = {f"{a}/{b}": paired(times, a, b) for a, b in (("sequential", "mean"), ("batched", "mean"),
                                                            ("sequential", "batched"), ("mean", "lora_forward"))}
    out = {"batch": args.batch, "seq_len": seq_len, "num_samples": s, "median_ms": ms, "clock": CLOCK["name"],
           **interleave.last, "paired": pairs,
           "sequential_over_mean": pairs["sequential/mean"]["median"], "batched_over_mean": pairs["batched/mean"]["median"],
           "batched_speedup": pairs["sequential/batched"]["median"], "mean_over_lora_forward": pairs["mean/lora_forward"]["median"]}
    log(f"predict T={seq_len}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
        + f"; S={s} sequential/mean {out['sequential_over_mean']:.2f}, batched/mean {out['batched_over_mean']:.2f}")
    return out


def section_overhead(args, log) -> dict:
    """Pyro's fixed cost per step where the network costs almost nothing (B=1, T=16)."""
    batch_size, seq_len = 1, 16
    setups = {k: build_setup(k, model=args.model, seq_len=seq_len, device=args.device) for k in SETUPS}
    batch = synthetic_batch(batch_size, seq_len, args.device)
    fns = {k: (lambda s=s: s.step(batch)) for k, s in setups.items()}
    times = interleave(fns, repeats=max(args.repeats, 7), warmup=args.warmup, device=args.device)
    ms = {k: med_ms(v) for k, v in times.items()}
    def diff(a, b):  # per round, a and b ran seconds apart
        return 1000 * statistics.median(x - y for x, y in zip(times[a], times[b]))

    out = {"batch": batch_size, "seq_len": seq_len, "median_ms": ms, "clock": CLOCK["name"], **interleave.last,
           "pyro_ms_blob": diff("blob", "blob_torch"), "pyro_ms_mle": diff("mle", "lora_torch")}
    log(f"overhead B=1 T=16: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
    return out


def _flipout_where(x, weight, loc, per="token"):
    """The Flipout of blob_pyro before this benchmark (reference only): int8 random signs per element and
    ``torch.where`` through plain autograd, which keeps a bool mask per sign and the flipped input alive."""
    def flip(t, shape):
        keep = torch.randint(0, 2, shape, dtype=torch.int8, device=t.device).bool()
        return torch.where(keep, t, -t)

    delta = weight - loc
    if per == "sequence":
        in_shape, out_shape = (x.shape[0], 1, x.shape[-1]), (x.shape[0], 1, weight.shape[0])
    else:
        in_shape, out_shape = x.shape, x.shape[:-1] + (weight.shape[0],)
    return F.linear(x, loc) + flip(F.linear(flip(x, in_shape), delta), out_shape)


def section_layer(args, log) -> dict:
    """BLoB's extra work in one LoRA layer, isolated: many fast interleaved repeats, so it is precise where
    whole steps (seconds each, on a shared machine) are not.

    One query/value-sized layer (in = out = hidden size 384, r = 8), input x (B, T, in) that needs a
    gradient, forward and backward as in training. ``lora``: B(A x), both deterministic (plain LoRA, mle).
    ``blob``: the Bayesian factor drawn from Normal(loc, rho^2) and applied with Flipout per token;
    ``blob_seq``: per-sequence signs; ``blob_where``: the previous Flipout implementation (per token), for
    reference. Factor ``B`` is blob_pyro's default, ``A`` the paper's. Also the bytes autograd keeps for
    backward (x itself excluded: every variant keeps it).
    """
    from blob_pyro.reparam import FlipoutMessenger, flipout_linear

    hidden, rank, scaling = 384, 8, 2.0
    out = {}
    for seq_len in args.seq_lens:
        for factor in ("B", "A"):
            torch.manual_seed(0)
            dev = args.device
            x = torch.randn(args.batch, seq_len, hidden, device=dev, requires_grad=True)
            grad = torch.randn(args.batch, seq_len, hidden, device=dev)
            a = torch.nn.Parameter(torch.randn(rank, hidden, device=dev) / hidden**0.5)
            b = torch.nn.Parameter(torch.randn(hidden, rank, device=dev) * 0.01)
            rho = torch.nn.Parameter(torch.full((hidden, rank) if factor == "B" else (rank, hidden), 0.05, device=dev))

            def lora():
                y = F.linear(F.linear(x, a), b) * scaling
                y.backward(grad)

            def blob(per="token", where=False):
                handler = FlipoutMessenger(per)
                with handler:
                    loc = b if factor == "B" else a
                    value = loc + rho.square() * torch.randn_like(loc)
                    handler.register(value, loc)
                    if where:
                        lin = lambda inp, w: _flipout_where(inp, w, loc, per)  # noqa: E731
                    else:
                        lin = flipout_linear
                    if factor == "B":
                        y = lin(F.linear(x, a), value) * scaling
                    else:
                        y = F.linear(lin(x, value), b) * scaling
                    y.backward(grad)

            fns = {"lora": lora, "blob": blob, "blob_seq": lambda: blob("sequence"),
                   "blob_where": lambda: blob(where=True)}
            times = interleave(fns, repeats=max(30, args.repeats), warmup=3, device=dev)
            ms = {k: med_ms(v) for k, v in times.items()}
            saved = {}
            for k, fn in fns.items():
                seen = {}

                def pack(t, seen=seen):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr != x.untyped_storage().data_ptr():
                        seen[ptr] = t.untyped_storage().nbytes()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    fn()
                saved[k] = sum(seen.values()) / 2**20
            row = {"batch": args.batch, "seq_len": seq_len, "factor": factor, "median_ms": ms, "clock": CLOCK["name"],
                   "saved_mb": saved, "paired": {f"{k}/lora": paired(times, k, "lora") for k in ("blob", "blob_seq", "blob_where")},
                   "extra_ms_per_layer": ms["blob"] - ms["lora"], "extra_ms_per_layer_seq": ms["blob_seq"] - ms["lora"]}
            out[f"{seq_len}-{factor}"] = row
            log(f"layer T={seq_len} factor {factor}: " + ", ".join(f"{k} {v:.2f} ms / {saved[k]:.2f} MB" for k, v in ms.items()))
    return out


def section_sweep(args, log) -> dict:
    base = dict(batch=args.sweep_base[0], seq_len=args.sweep_base[1], lora_layers=12)
    points = [dict(base)]
    points += [dict(base, batch=b) for b in args.sweep_batches if b != base["batch"]]
    points += [dict(base, seq_len=t) for t in args.sweep_seq_lens if t != base["seq_len"]]
    points += [dict(base, lora_layers=n) for n in args.sweep_layers if n != base["lora_layers"]]
    cache: dict = {}
    rows = []
    for p in points:
        key = (p["lora_layers"], p["seq_len"])
        if key not in cache:
            cache.clear()
            gc.collect()
            cache[key] = {k: build_setup(k, model=args.model, seq_len=p["seq_len"], device=args.device,
                                         lora_layers=None if p["lora_layers"] == 12 else p["lora_layers"])
                          for k in ("lora_torch", "mle", "blob")}
        setups = cache[key]
        batch = synthetic_batch(p["batch"], p["seq_len"], args.device)
        fns = {k: (lambda s=s: s.step(batch)) for k, s in setups.items()}
        times = interleave(fns, repeats=args.sweep_repeats, warmup=1, device=args.device)
        ms = {k: med_ms(v) for k, v in times.items()}
        saved = {k: saved_for_backward_bytes(s, batch) / 2**20 for k, s in setups.items()}
        row = dict(p, median_ms=ms, saved_mb=saved, blob_over_mle=paired(times, "blob", "mle")["median"],
                   blob_over_lora_torch=paired(times, "blob", "lora_torch")["median"],
                   saved_blob_over_mle=saved["blob"] / saved["mle"])
        rows.append(row)
        log(f"sweep {p}: blob/mle {row['blob_over_mle']:.3f}, blob/lora {row['blob_over_lora_torch']:.3f}, "
            f"saved blob/mle {row['saved_blob_over_mle']:.3f}")
    return {"rows": rows}


# ---- report ---------------------------------------------------------------------------------------------
TARGETS = {"step": 1.10, "memory": 1.15, "pyro_share": 0.03, "predict": 10.5}


def _yes(ok: bool) -> str:
    return "met" if ok else "**missed**"


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    clock = {"cpu": "process CPU time", "wall": "wall-clock time"}.get(meta.get("clock"), "?")
    lines = [f"Device: {meta.get('device_name', '?')}; torch {meta.get('torch')}, pyro {meta.get('pyro')}, "
             f"{meta.get('threads')} thread(s); times are {clock}; model `{meta.get('model')}`.", ""]
    step, mem, pred, over, layer, sweep = (results.get(k) for k in SECTIONS)
    def pr(r, key):
        p = r["paired"][key]
        return f"{p['median']:.3f} [{p['q1']:.2f}–{p['q3']:.2f}]"

    pyro_ms = over["pyro_ms_blob"] if over else None
    if step:
        lines += ["**Training step** (median ms over interleaved rounds after warm-up; ratios: median [quartiles] of "
                  "the per-round ratio)", "",
                  "| B | T | LoRA (PyTorch) | mle (Pyro) | blob | blob, per-sequence signs | blob / mle | "
                  "blob / LoRA (PyTorch) | blob-seq / mle | mle / LoRA (PyTorch) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in step.values():
            m = r["median_ms"]
            lines.append(f"| {r['batch']} | {r['seq_len']} | {m['lora_torch']:.0f} | {m['mle']:.0f} | {m['blob']:.0f} | "
                         f"{m['blob_seq']:.0f} | {pr(r, 'blob/mle')} | {pr(r, 'blob/lora_torch')} | "
                         f"{pr(r, 'blob_seq/mle')} | {pr(r, 'mle/lora_torch')} |")
        lines.append("")
        if pyro_ms is not None:
            lines += [f"Pyro's share of the blob step: its fixed per-step cost ({pyro_ms:.1f} ms, measured at B=1, T=16 "
                      f"below; it does not grow with batch or sequence length) over the blob step: "
                      + ", ".join(f"T={r['seq_len']}: {100 * pyro_ms / r['median_ms']['blob']:.2f} %" for r in step.values())
                      + ".", ""]
    if layer:
        nl = 12
        lines += ["**One LoRA layer** (hidden 384, r=8, forward + backward; median ms of interleaved repeats, and MB "
                  "kept for backward besides the input x): BLoB's Bayesian factor with Flipout against plain LoRA; "
                  "`where` is the previous Flipout implementation", "",
                  "| B | T | Bayesian factor | LoRA | blob (per token) | blob (per sequence) | blob, previous `where` | "
                  "saved: LoRA / blob / blob-seq / previous | blob extra × 12 layers, share of the LoRA (PyTorch) step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, r in layer.items():
            m, sv, t = r["median_ms"], r["saved_mb"], str(r["seq_len"])
            share = ""
            if step and t in step:
                share = f"{100 * nl * r['extra_ms_per_layer'] / step[t]['median_ms']['lora_torch']:.1f} %"
            lines.append(f"| {r['batch']} | {t} | {r['factor']} | {m['lora']:.2f} | {m['blob']:.2f} | {m['blob_seq']:.2f} | "
                         f"{m['blob_where']:.2f} | {sv['lora']:.2f} / {sv['blob']:.2f} / {sv['blob_seq']:.2f} / "
                         f"{sv['blob_where']:.2f} | {share} |")
        lines.append("")
    if mem:
        kind = next(iter(next(iter(mem.values())).values()))["kind"]
        what = "peak RSS" if kind == "rss" else "torch.cuda.max_memory_allocated"
        lines += [f"**Peak memory** ({what}, MB; each configuration in a fresh process; 'step' = peak minus the "
                  f"warmed-up resident size before the step; 'saved' = tensors autograd keeps for backward)", "",
                  "| T | configuration | peak | step | saved for backward | peak / mle | step / mle | saved / mle |",
                  "|---|---|---|---|---|---|---|---|"]
        for t, rows in mem.items():
            for k, r in rows.items():
                so = r["step_over_mle"]
                lines.append(f"| {t} | {k} | {r['peak_mb']:.0f} | {r['step_mb']:.0f} | {r['saved_for_backward_mb']:.1f} | "
                             f"{r['peak_over_mle']:.3f} | {'' if so is None else f'{so:.3f}'} | {r['saved_over_mle']:.3f} |")
        lines.append("")
    if pred:
        m = pred["median_ms"]
        lines += [f"**Prediction** (B={pred['batch']}, T={pred['seq_len']}, median ms; ratios are medians of per-round ratios)", "",
                  f"| plain LoRA forward | posterior mean (S=0) | S={pred['num_samples']} sequential | "
                  f"S={pred['num_samples']} sample-batched | sequential / mean | batched / mean | batched speed-up over sequential |",
                  "|---|---|---|---|---|---|---|",
                  f"| {m['lora_forward']:.0f} | {m['mean']:.0f} | {m['sequential']:.0f} | {m['batched']:.0f} | "
                  f"{pred['sequential_over_mean']:.2f} | {pred['batched_over_mean']:.2f} | {pred['batched_speedup']:.2f}× |", ""]
    if over:
        m = over["median_ms"]
        lines += [f"**Fixed per-step cost** (B={over['batch']}, T={over['seq_len']}: the network costs almost nothing; "
                  f"median ms; the last two columns are medians of per-round differences)", "",
                  "| LoRA (PyTorch) | mle (Pyro) | blob | blob (plain PyTorch twin) | Pyro + bookkeeping, blob | "
                  "Pyro + bookkeeping, mle |",
                  "|---|---|---|---|---|---|",
                  f"| {m['lora_torch']:.1f} | {m['mle']:.1f} | {m['blob']:.1f} | {m['blob_torch']:.1f} | "
                  f"{over['pyro_ms_blob']:.1f} | {over['pyro_ms_mle']:.1f} |", ""]
    if sweep:
        lines += ["**Sweep** (median ms per step; saved-for-backward MB)", "",
                  "| B | T | LoRA layers | LoRA (PyTorch) | mle | blob | blob/mle | blob/LoRA | saved mle | saved blob | saved blob/mle |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sweep["rows"]:
            m, sv = r["median_ms"], r["saved_mb"]
            lines.append(f"| {r['batch']} | {r['seq_len']} | {r['lora_layers']} | {m['lora_torch']:.0f} | {m['mle']:.0f} | "
                         f"{m['blob']:.0f} | {r['blob_over_mle']:.3f} | {r['blob_over_lora_torch']:.3f} | {sv['mle']:.1f} | "
                         f"{sv['blob']:.1f} | {r['saved_blob_over_mle']:.3f} |")
        lines.append("")
    checks = []
    if step:
        for r in step.values():
            checks.append((f"step time blob / mle, T={r['seq_len']}", f"≤ {TARGETS['step']}", f"{r['blob_over_mle']:.3f}",
                           r["blob_over_mle"] <= TARGETS["step"]))
            checks.append((f"step time blob / LoRA (PyTorch), T={r['seq_len']}", f"≤ {TARGETS['step']}",
                           f"{r['blob_over_lora_torch']:.3f}", r["blob_over_lora_torch"] <= TARGETS["step"]))
            if pyro_ms is not None:
                share = pyro_ms / r["median_ms"]["blob"]
                checks.append((f"Pyro share of the blob step, T={r['seq_len']}", "≤ 3 %", f"{100 * share:.2f} %",
                               share <= TARGETS["pyro_share"]))
    if mem:
        for t, rows in mem.items():
            r = rows["blob"]
            checks.append((f"peak memory blob / mle, T={t}", f"≤ {TARGETS['memory']}", f"{r['peak_over_mle']:.3f}",
                           r["peak_over_mle"] <= TARGETS["memory"]))
            if r["step_over_mle"] is not None:
                checks.append((f"step memory (peak − base) blob / mle, T={t}", f"≤ {TARGETS['memory']}",
                               f"{r['step_over_mle']:.3f}", r["step_over_mle"] <= TARGETS["memory"]))
    if pred:
        checks.append((f"prediction S={pred['num_samples']} (sequential) / one mean pass", f"≤ {TARGETS['predict']}",
                       f"{pred['sequential_over_mean']:.2f}", pred["sequential_over_mean"] <= TARGETS["predict"]))
        checks.append((f"prediction S={pred['num_samples']} (sample-batched) / one mean pass", f"≤ {TARGETS['predict']}",
                       f"{pred['batched_over_mean']:.2f}", pred["batched_over_mean"] <= TARGETS["predict"]))
    if checks:
        lines += ["**Targets**", "", "| target | bound | measured | |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {_yes(ok)} |" for a, b, c, ok in checks]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--model", default="minilm")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=10)
    p.add_argument("--sweep-base", type=int, nargs=2, default=[8, 64], metavar=("B", "T"))
    p.add_argument("--sweep-batches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--sweep-seq-lens", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--sweep-layers", type=int, nargs="+", default=[2, 6, 12])
    p.add_argument("--sweep-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="auto: process CPU time on CPU with one thread (robust on a shared machine), else wall time")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats: checks the script, not the numbers")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON, measure nothing")
    p.add_argument("--child-memory", choices=SETUPS, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lora-layers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if torch.device(args.device).type == "cpu" and torch.get_num_threads() == 1 else "wall"
    CLOCK["name"] = args.clock
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.child_memory:
        print(json.dumps(memory_child(args)))
        return 0
    if args.quick:
        args.batch, args.seq_lens, args.repeats, args.warmup, args.num_samples = 2, [16], 2, 1, 3
        args.sweep_base, args.sweep_batches, args.sweep_seq_lens, args.sweep_layers = [2, 16], [2], [16], [2, 12]
        args.sweep_repeats = 1
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device).type
    suffix = "-quick" if args.quick else ""
    json_path, md_path = out_dir / f"perf-{dev}{suffix}.json", out_dir / f"perf-{dev}{suffix}.md"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.report_only:
        md_path.write_text(_report(results))
        print(md_path.read_text())
        return 0
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({os.cpu_count()} cores visible, {platform.processor() or platform.machine()})"
    results["meta"] = {"device": args.device, "device_name": name, "torch": torch.__version__, "pyro": pyro.__version__,
                       "clock": args.clock,
                       "threads": torch.get_num_threads(), "model": args.model, "python": platform.python_version(),
                       "command": "python benchmarks/perf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    runners = {"step": section_step, "memory": section_memory, "predict": section_predict,
               "overhead": section_overhead, "layer": section_layer, "sweep": section_sweep}
    for section in sections:
        t_section = time.perf_counter()
        results[section] = runners[section](args, log)
        results[section]["_seconds"] = time.perf_counter() - t_section
        results[section]["_command"] = results["meta"]["command"]
        json_path.write_text(json.dumps(results, indent=1) + "\n")
    results["meta"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(_report(results))
    print(md_path.read_text())
    return 0


def _report(results: dict) -> str:
    commands = {k: v["_command"] for k, v in results.items() if k in SECTIONS and isinstance(v, dict) and "_command" in v}
    body = markdown({k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) and k in SECTIONS
                         else v) for k, v in results.items()})
    if commands:
        body += "\nCommands: " + "; ".join(f"{k}: `{c}`" for k, c in commands.items()) + "\n"
    return body + "\n"


if __name__ == "__main__":
    sys.exit(main())
