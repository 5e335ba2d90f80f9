"""BLoB's cost against plain LoRA: step time, peak memory, prediction, Pyro's share, a small sweep.

One command; every ratio is measured inside one process run (interleaved repeats after warm-up,
medians), so it holds on a shared, noisy machine::

    python benchmarks/perf.py                                # everything (CPU protocol: MiniLM-L6, B=16, T=128/256)
    python benchmarks/perf.py --sections step,predict        # some sections (results merge into the same JSON)
    python benchmarks/perf.py --quick                        # smoke run in seconds (tiny sizes, 2 repeats)
    python benchmarks/perf.py --device cuda                  # on a GPU: torch.cuda.max_memory_allocated for memory
    python benchmarks/perf.py --compare-src ../baseline      # this checkout against another one, interleaved

Writes ``benchmarks/results/perf-<device>.json`` (every number, the command, versions) and
``perf-<device>.md`` (the tables and the targets; ``benchmarks/results/perf.md`` reads them). A section run
again replaces its own entry and keeps the others.

Configurations (same backbone, synthetic fixed-length batch, LoRA r=8 on query/value):

- ``lora_torch``  plain PEFT LoRA in pure PyTorch (no Pyro): forward, cross-entropy, backward, AdamW — the floor;
- ``mle``         the same LoRA trained through blob_pyro (Pyro's ELBO, AutoDelta, KL weight 0): ``--method mle``;
- ``blob``        BLoB (Bayesian B factor, mean-field guide, Flipout signs per token, the default);
- ``blob_seq``    BLoB with Flipout signs per sequence (``--flipout-per sequence``);
- ``paper``       BLoB's paper preset (``--preset paper``: Bayesian A, AdamW on the NLL then SGD on the KL);
- ``blob_torch``  BLoB's exact computation written in plain PyTorch (sampling, Flipout, closed-form KL, one
  AdamW): ``blob`` minus this is the time spent in Pyro's machinery (traces, replay, param store) and
  blob_pyro's bookkeeping;
- ``lora_compiled``, ``mle_compiled``, ``blob_compiled`` (``--compiled``, step and overhead sections): plain LoRA with
  ``torch.compile`` of the PEFT network, and mle / blob with ``--compile true`` (the network part compiled,
  Pyro eager; :mod:`blob_pyro.compiled`). Each is compiled and warmed up before the timed rounds;
- ``blob_compiled_cpp`` (``--compiled``, overhead section, CPU only): ``blob_compiled`` with Inductor's C++ wrapper
  (``compile_cpp_wrapper=true``).

Sections: ``step`` (step time), ``memory`` (peak memory; each configuration in a fresh subprocess),
``predict`` (S=10 sequential and sample-batched vs one posterior-mean pass), ``overhead`` (the fixed cost
per step at a tiny size, B=1 and T=16, of every configuration), ``layer`` (one Flipout layer), ``sweep``
(batch size, sequence length, number of LoRA layers).

``--compare-src DIR`` measures the ``step``, ``memory``, ``predict`` and ``overhead`` sections twice in one
run: with this checkout's blob_pyro and with the one in DIR (another checkout or git worktree, e.g. the
commit before a refactoring). Each side lives in its own worker process (``PYTHONPATH=<side>``) driven by
this script; every round runs every configuration of both sides once, in a fresh random order, and the
report gives each figure's new/old ratio (median and quartiles of the per-round ratio). It writes
``perf-<device>-compare.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# the checkout whose blob_pyro is measured: this one, or (in a --compare-src worker) the one it names
SRC = Path(os.environ.get("BLOB_PERF_SRC") or REPO).resolve()
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SECTIONS = ("step", "memory", "predict", "overhead", "layer", "sweep")
COMPARE_SECTIONS = ("step", "memory", "predict", "overhead")
SETUPS = ("lora_torch", "mle", "blob", "blob_seq", "paper", "blob_torch")
COMPILED_SETUPS = ("lora_compiled", "mle_compiled", "blob_compiled")
CPP_SETUPS = ("blob_compiled_cpp",)  # the overhead section's on a CPU: blob with compile_cpp_wrapper
STEP_SETUPS = ("lora_torch", "mle", "blob", "blob_seq")
NUM_DATA = 640  # N for the likelihood scale and KL weight (WinoGrande-S size); does not change the cost
CLOSE = 0.02  # --compare-src: a figure within 2 % of the other side's counts as unchanged


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


# ---- the blob_pyro under test -----------------------------------------------------------------------
# The only places that call blob_pyro's training API. --compare-src may point at a checkout from before the
# restructure of 5cb28e0 (TrainConfig, make_stepper, blob_pyro.runs / .reparam, guides set up from a batch):
# the `_OLD_API` branches drive that one, so both sides run this same harness. Drop them once no comparison
# needs a checkout that old.
def _old_api() -> bool:
    import blob_pyro.config

    return not hasattr(blob_pyro.config, "RunConfig")


def _flipout_messenger():
    if _old_api():
        from blob_pyro.reparam import FlipoutMessenger
    else:
        from blob_pyro.poutine import FlipoutMessenger
    return FlipoutMessenger


def _build(settings: dict):
    """The run (model, guide; no data) for flat ``settings``; ``run.config`` has the method and preset applied."""
    if _old_api():
        from blob_pyro.config import TrainConfig
        from blob_pyro.runs import build

        return build(TrainConfig(**settings), with_data=False)
    from blob_pyro.config import RunConfig
    from blob_pyro.training import build

    return build(RunConfig.from_dict(settings), with_data=False)


def _stepper(run, lr: float):
    """The training step of ``run.config`` with AdamW at ``lr`` and a schedule too long to leave warm-up."""
    if _old_api():
        from blob_pyro.infer import make_stepper

        c = run.config
        return make_stepper(run.model, run.guide, max_steps=10**9, lr=lr, use_flipout=c.flipout,
                            flipout_per=c.flipout_per, elbo=c.elbo, preset=c.preset, kl_lr=c.kl_lr)
    from blob_pyro.infer import make_step

    return make_step(run.model, run.guide, dataclasses.replace(run.config.fit, max_steps=10**9, lr=lr))


def _register_parameters(model, guide) -> None:
    """Every parameter of the model and guide in Pyro's param store, outside any timed region."""
    if _old_api():
        with torch.no_grad():
            guide(model.example_batch())
        return
    from blob_pyro.optim import register_parameters

    register_parameters(model, guide)


def library_info() -> dict:
    """Which blob_pyro this process measures: its folder, version and git commit."""
    import blob_pyro

    folder = Path(blob_pyro.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=folder, capture_output=True,
                                    text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"blob_pyro": str(folder), "version": getattr(blob_pyro, "__version__", None), "git_commit": commit,
            "uncommitted_changes": dirty, "api": "TrainConfig (old)" if _old_api() else "RunConfig",
            "torch": torch.__version__, "pyro": pyro.__version__}


def build_setup(kind: str, *, model: str, seq_len: int, device: str, lora_layers: int | None = None,
                lr: float = 1e-4, seed: int = 0) -> Setup:
    torch.manual_seed(seed)
    if kind in ("lora_torch", "lora_compiled"):
        return _lora_torch(model, seq_len, device, lora_layers, lr, compiled=kind == "lora_compiled")
    cpp = kind.endswith("_cpp")
    kind = kind.removesuffix("_cpp")
    compiled = kind.endswith("_compiled")
    kind = kind.removesuffix("_compiled")
    settings = dict(model=model, dataset="winogrande_s", head="sequence_classification",
                    method="mle" if kind == "mle" else "blob", max_length=seq_len, device=device,
                    target_modules=targets_for(lora_layers), flipout_per="sequence" if kind == "blob_seq" else "token",
                    seed=seed)
    if kind == "paper":
        settings["preset"] = "paper"
    slot = StoreSlot()
    with slot.active():
        run = _build(settings)
        run.model.num_data = NUM_DATA
        run.model.network.eval()
        if compiled:
            run.model.compile_network(**({"options": {"cpp_wrapper": True}} if cpp else {}))
        if kind == "blob_torch":
            step = _blob_torch_step(run.model, run.guide, lr, settings["flipout_per"])
        else:
            stepper = _stepper(run, lr)
            weight = 0.0 if kind == "mle" else 1.0 / NUM_DATA

            def step(batch):
                return stepper.step(batch, weight, NUM_DATA)["loss"]
    return Setup(kind + ("_compiled" if compiled else "") + ("_cpp" if cpp else ""), step, slot, run.model, run.guide,
                 modules=[run.model.network])


def _lora_torch(model: str, seq_len: int, device: str, lora_layers, lr: float, compiled: bool = False) -> Setup:
    from peft import LoraConfig, get_peft_model

    from blob_pyro.backbone import default_targets, load_backbone

    hf, _, _ = load_backbone(model, num_classes=2, head="sequence_classification")
    targets = targets_for(lora_layers) or default_targets(hf.config)
    net = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                        modules_to_save=["classifier"])).to(device).eval()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    forward = torch.compile(net) if compiled else net

    def step(batch):
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).logits.float()
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Setup("lora_compiled" if compiled else "lora_torch", step, modules=[net])


def _blob_torch_step(model, guide, lr: float, per: str):
    """BLoB's step without Pyro: draw, Flipout, NLL + KL/N, backward, one AdamW over every parameter."""
    from blob_pyro.guides import deep_getattr
    from blob_pyro.lora import bind_values

    FlipoutMessenger = _flipout_messenger()
    _register_parameters(model, guide)
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
    core that another process holds is not counted); both clocks are kept in ``interleave.last``. A function
    with a ``timed()`` method (:class:`RemoteFn`) is timed by that method: where it runs.
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
            fn = fns[name]
            w, c = fn.timed() if hasattr(fn, "timed") else timed(fn, device)
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


def _env_for(src: Path) -> dict:
    """The environment of a child measuring the blob_pyro in ``src``: that checkout first on the path, then any
    PYTHONPATH the caller set (packages unpacked into a folder, as on the GPU machine)."""
    path = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, BLOB_PERF_SRC=str(src), PYTHONPATH=path, OMP_NUM_THREADS=str(torch.get_num_threads()))


def run_memory_child(kind: str, args, seq_len: int, lora_layers=None, src: Path = SRC) -> dict:
    env = dict(_env_for(src), MALLOC_MMAP_THRESHOLD_="65536")  # big blocks go back to the OS when freed
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", kind, "--seq-len", str(seq_len),
           "--batch", str(args.batch), "--device", args.device, "--model", args.model]
    if lora_layers is not None:
        cmd += ["--lora-layers", str(lora_layers)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- what the timed sections run: name -> function, built where the library under test is --------------
def step_fns(args, seq_len: int, compiled: bool = False) -> dict:
    kinds = STEP_SETUPS + (COMPILED_SETUPS if compiled else ())
    setups = {k: build_setup(k, model=args.model, seq_len=seq_len, device=args.device) for k in kinds}
    batch = synthetic_batch(args.batch, seq_len, args.device)
    _warm_compiled(setups, batch)
    return {k: (lambda s=s: s.step(batch)) for k, s in setups.items()}


def _warm_compiled(setups: dict, batch) -> None:
    for k in COMPILED_SETUPS + CPP_SETUPS:
        for _ in range(3 if k in setups else 0):  # blob's first call of a shape counts its signs eagerly; the second compiles
            setups[k].step(batch)


def predict_fns(args, seq_len: int) -> dict:
    from blob_pyro.predictive import posterior_logits

    blob = build_setup("blob", model=args.model, seq_len=seq_len, device=args.device)
    lora = build_setup("lora_torch", model=args.model, seq_len=seq_len, device=args.device)
    net = lora.modules[0]
    batch = synthetic_batch(args.batch, seq_len, args.device)
    s = args.num_samples

    def post(**kw):  # Flipout as the model says (per token): the default of both library versions
        with blob.context():
            posterior_logits(blob.model, blob.guide, batch, **kw)

    def lora_forward():
        with torch.no_grad():
            net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])

    return {"lora_forward": lora_forward, "mean": lambda: post(num_samples=0),
            "sequential": lambda: post(num_samples=s), "batched": lambda: post(num_samples=s, sample_batched=True)}


OVERHEAD_SIZE = (1, 16)  # B, T: the network costs almost nothing


def overhead_fns(args, compiled: bool = False) -> dict:
    batch_size, seq_len = OVERHEAD_SIZE
    # the C++ wrapper on a CPU only: a GPU's GPU-side compile of it is untried here and would eat the GPU check's minutes
    cpp = CPP_SETUPS if torch.device(args.device).type == "cpu" else ()
    kinds = SETUPS + (COMPILED_SETUPS + cpp if compiled else ())
    setups = {k: build_setup(k, model=args.model, seq_len=seq_len, device=args.device) for k in kinds}
    batch = synthetic_batch(batch_size, seq_len, args.device)
    _warm_compiled(setups, batch)
    return {k: (lambda s=s: s.step(batch)) for k, s in setups.items()}


FNS = {"step": step_fns, "predict": predict_fns, "overhead": overhead_fns}


class Local:
    """Sections measured in this process, with the blob_pyro it imports."""

    side = None
    src = SRC

    def __init__(self, args):
        self.args = args

    def measure(self, what: str, params: dict, *, repeats: int, warmup: int) -> tuple[dict, dict]:
        """(seconds per call by the chosen clock, both clocks in ms) of ``FNS[what](args, **params)``."""
        fns = FNS[what](self.args, **params)
        times = interleave(fns, repeats=repeats, warmup=warmup, device=self.args.device)
        clocks = interleave.last
        del fns
        gc.collect()
        return times, clocks


# ---- sections -----------------------------------------------------------------------------------------
def section_step(args, log, ctx) -> dict:
    out = {}
    compiled = bool(getattr(args, "compiled", False)) and isinstance(ctx, Local)
    pairs = (("blob", "mle"), ("blob", "lora_torch"), ("blob_seq", "mle"), ("mle", "lora_torch"))
    if compiled:
        pairs += (("blob_compiled", "blob"), ("mle_compiled", "mle"), ("lora_compiled", "lora_torch"),
                  ("blob_compiled", "lora_torch"))
    for seq_len in args.seq_lens:
        params = {"seq_len": seq_len, **({"compiled": True} if compiled else {})}
        times, clocks = ctx.measure("step", params, repeats=args.repeats, warmup=args.warmup)
        ms = {k: med_ms(v) for k, v in times.items()}
        row = {"batch": args.batch, "seq_len": seq_len, "median_ms": ms, "clock": CLOCK["name"], **clocks,
               "paired": {f"{a}/{b}": paired(times, a, b) for a, b in pairs}}
        row["blob_over_mle"] = row["paired"]["blob/mle"]["median"]
        row["blob_over_lora_torch"] = row["paired"]["blob/lora_torch"]["median"]
        out[str(seq_len)] = row
        log(f"step T={seq_len}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
            + f"; blob/mle {row['blob_over_mle']:.3f}, blob/lora_torch {row['blob_over_lora_torch']:.3f}")
    return out


def section_memory(args, log, ctx) -> dict:
    out = {}
    for seq_len in args.seq_lens:
        rows = {k: run_memory_child(k, args, seq_len, src=ctx.src) for k in ("lora_torch", "mle", "blob", "blob_seq")}
        for r in rows.values():
            r["peak_over_mle"] = r["peak_mb"] / rows["mle"]["peak_mb"]
            r["step_over_mle"] = r["step_mb"] / rows["mle"]["step_mb"] if rows["mle"]["step_mb"] > 0 else None
            r["saved_over_mle"] = r["saved_for_backward_mb"] / rows["mle"]["saved_for_backward_mb"]
        out[str(seq_len)] = rows
        log(f"memory T={seq_len}: " + ", ".join(f"{k} peak {r['peak_mb']:.0f} MB (+{r['step_mb']:.0f}), saved "
                                                f"{r['saved_for_backward_mb']:.1f} MB" for k, r in rows.items()))
    return out


def section_predict(args, log, ctx) -> dict:
    seq_len, s = args.seq_lens[0], args.num_samples
    times, clocks = ctx.measure("predict", {"seq_len": seq_len}, repeats=args.repeats, warmup=args.warmup)
    ms = {k: med_ms(v) for k, v in times.items()}
    pairs = {f"{a}/{b}": paired(times, a, b) for a, b in (("sequential", "mean"), ("batched", "mean"),
                                                            ("sequential", "batched"), ("mean", "lora_forward"))}
    out = {"batch": args.batch, "seq_len": seq_len, "num_samples": s, "median_ms": ms, "clock": CLOCK["name"],
           **clocks, "paired": pairs,
           "sequential_over_mean": pairs["sequential/mean"]["median"],
           "batched_over_mean": pairs["batched/mean"]["median"],
           "batched_speedup": pairs["sequential/batched"]["median"],
           "mean_over_lora_forward": pairs["mean/lora_forward"]["median"]}
    log(f"predict T={seq_len}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
        + f"; S={s} sequential/mean {out['sequential_over_mean']:.2f}, batched/mean {out['batched_over_mean']:.2f}")
    return out


def op_counts(fn, *, warmup: int = 3) -> dict:
    """Operators one call of ``fn`` dispatches: ``ops``, the aten operators not called inside another one (what
    the forward pass and autograd's backward dispatch), and ``scalar_reads``, the values read back to Python
    (``aten::_local_scalar_dense``, under ``.item()``, ``float()`` or ``bool()`` of a tensor: a host sync each when
    the tensor lives on a GPU; ``tolist()`` dispatches no operator the profiler sees and is not counted).

    Counts do not depend on the machine's load, unlike times: at B=1, T=16 each operator costs a few
    microseconds of dispatch on a CPU and a kernel launch on a GPU, so the count is the fixed cost's floor.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    reads = sum(e.name == "aten::_local_scalar_dense" for e in events)
    return {"ops": len(top), "scalar_reads": reads}


def section_overhead(args, log, ctx) -> dict:
    """The fixed cost per step of every configuration where the network costs almost nothing (B=1, T=16), and
    (in a plain run, not ``--compare-src``) the operators each step dispatches."""
    batch_size, seq_len = OVERHEAD_SIZE
    compiled = bool(getattr(args, "compiled", False)) and isinstance(ctx, Local)
    times, clocks = ctx.measure("overhead", {"compiled": True} if compiled else {}, repeats=max(args.repeats, 7),
                                warmup=args.warmup)
    ms = {k: med_ms(v) for k, v in times.items()}

    def diff(a, b):  # per round, a and b ran seconds apart
        return 1000 * statistics.median(x - y for x, y in zip(times[a], times[b]))

    out = {"batch": batch_size, "seq_len": seq_len, "median_ms": ms, "clock": CLOCK["name"], **clocks,
           "pyro_ms_blob": diff("blob", "blob_torch"), "pyro_ms_mle": diff("mle", "lora_torch")}
    if compiled:  # the fixed cost left with the network compiled, against eager and against compiled plain LoRA
        out["compiled_over_lora_ms"] = {k: diff(f"{k}_compiled", "lora_torch") for k in ("mle", "blob")}
        pairs = (("blob_compiled", "lora_torch"), ("mle_compiled", "lora_torch"), ("blob_compiled", "blob"),
                 ("mle_compiled", "mle"), ("lora_compiled", "lora_torch"), ("blob_compiled", "lora_compiled"))
        if "blob_compiled_cpp" in times:
            out["compiled_over_lora_ms"]["blob_cpp"] = diff("blob_compiled_cpp", "lora_torch")
            pairs += (("blob_compiled_cpp", "lora_torch"), ("blob_compiled_cpp", "blob_compiled"))
        out["compiled_over_lora_compiled_ms"] = {k: diff(f"{k}_compiled", "lora_compiled") for k in ("mle", "blob")}
        out["compiled_ratio"] = {f"{a}/{b}": paired(times, a, b)["median"] for a, b in pairs}
    log(f"overhead B={batch_size} T={seq_len}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
    if isinstance(ctx, Local):
        fns = FNS["overhead"](args)
        out["ops_per_step"] = {k: op_counts(fn) for k, fn in fns.items()}  # SETUPS only: a compiled kernel is no aten op
        del fns
        gc.collect()
        log("operators per step: " + ", ".join(f"{k} {c['ops']} ({c['scalar_reads']} reads)"
                                                for k, c in out["ops_per_step"].items()))
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


def _layer_fns(batch: int, seq_len: int, factor: str, device) -> tuple[dict, torch.Tensor]:
    """The four variants of one layer (see :func:`section_layer`) and their input x."""
    from blob_pyro.poutine import FlipoutMessenger, flipout_linear

    hidden, rank, scaling = 384, 8, 2.0
    torch.manual_seed(0)
    x = torch.randn(batch, seq_len, hidden, device=device, requires_grad=True)
    grad = torch.randn(batch, seq_len, hidden, device=device)
    a = torch.nn.Parameter(torch.randn(rank, hidden, device=device) / hidden**0.5)
    b = torch.nn.Parameter(torch.randn(hidden, rank, device=device) * 0.01)
    rho = torch.nn.Parameter(torch.full((hidden, rank) if factor == "B" else (rank, hidden), 0.05, device=device))

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

    return {"lora": lora, "blob": blob, "blob_seq": lambda: blob("sequence"), "blob_where": lambda: blob(where=True)}, x


def section_layer(args, log, ctx) -> dict:
    """BLoB's extra work in one LoRA layer, isolated: many fast interleaved repeats, so it is precise where
    whole steps (seconds each, on a shared machine) are not.

    One query/value-sized layer (in = out = hidden size 384, r = 8), input x (B, T, in) that needs a
    gradient, forward and backward as in training. ``lora``: B(A x), both deterministic (plain LoRA, mle).
    ``blob``: the Bayesian factor drawn from Normal(loc, rho^2) and applied with Flipout per token;
    ``blob_seq``: per-sequence signs; ``blob_where``: the previous Flipout implementation (per token), for
    reference. Factor ``B`` is blob_pyro's default, ``A`` the paper's. Also the bytes autograd keeps for
    backward (x itself excluded: every variant keeps it).
    """
    out = {}
    for seq_len in args.seq_lens:
        for factor in ("B", "A"):
            fns, x = _layer_fns(args.batch, seq_len, factor, args.device)
            times = interleave(fns, repeats=max(30, args.repeats), warmup=3, device=args.device)
            ms = {k: med_ms(v) for k, v in times.items()}
            saved = {}
            x_ptr = x.untyped_storage().data_ptr()
            for k, fn in fns.items():
                seen = {}

                def pack(t, seen=seen, x_ptr=x_ptr):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr != x_ptr:
                        seen[ptr] = t.untyped_storage().nbytes()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    fn()
                saved[k] = sum(seen.values()) / 2**20
            row = {"batch": args.batch, "seq_len": seq_len, "factor": factor, "median_ms": ms, "clock": CLOCK["name"],
                   "saved_mb": saved,
                   "paired": {f"{k}/lora": paired(times, k, "lora") for k in ("blob", "blob_seq", "blob_where")},
                   "extra_ms_per_layer": ms["blob"] - ms["lora"], "extra_ms_per_layer_seq": ms["blob_seq"] - ms["lora"]}
            out[f"{seq_len}-{factor}"] = row
            log(f"layer T={seq_len} factor {factor}: "
                + ", ".join(f"{k} {v:.2f} ms / {saved[k]:.2f} MB" for k, v in ms.items()))
    return out


def section_sweep(args, log, ctx) -> dict:
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
        fns = {k: (lambda s=s, batch=batch: s.step(batch)) for k, s in setups.items()}
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


# ---- --compare-src: two checkouts, one run ------------------------------------------------------------------
def worker_main(args) -> int:
    """``--worker``: build and time the functions of ``FNS`` on request, one JSON line in, one out.

    Requests: ``{"op": "info"}``, ``{"op": "prepare", "what": ..., "params": {...}}`` (replaces the previous
    functions), ``{"op": "call", "name": ...}`` (-> ``{"wall", "cpu"}`` seconds of that one call, measured
    here), ``{"op": "release"}``. Replies carry ``"error"`` instead when a request failed.
    """
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever the libraries print goes to stderr
    fns: dict = {}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "info":
                reply = library_info()
            elif msg["op"] == "prepare":
                fns.clear()
                gc.collect()
                fns.update(FNS[msg["what"]](args, **msg["params"]))
                reply = {"names": list(fns)}
            elif msg["op"] == "call":
                wall, cpu = timed(fns[msg["name"]], args.device)
                reply = {"wall": wall, "cpu": cpu}
            elif msg["op"] == "release":
                fns.clear()
                gc.collect()
                reply = {}
            else:
                reply = {"error": f"unknown request {msg['op']!r}"}
        except Exception:  # report it to the driver, which stops with the traceback
            reply = {"error": traceback.format_exc(limit=8)}
        proto.write(json.dumps(reply) + "\n")
    return 0


class Worker:
    """A ``perf.py --worker`` process measuring the blob_pyro of checkout ``src``."""

    def __init__(self, side: str, src: Path, argv: list[str]):
        self.side, self.src = side, src
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env=_env_for(src))
        self.info = self.request(op="info")

    def request(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker ({self.src}) exited with code {self.proc.wait()}; "
                               f"its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.side} worker ({self.src}) failed:\n{reply['error']}")
        return reply

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


class RemoteFn:
    """One function of a worker; :func:`interleave` times it with :meth:`timed` (measured in the worker)."""

    def __init__(self, worker: Worker, name: str):
        self.worker, self.name = worker, name

    def __call__(self):
        self.worker.request(op="call", name=self.name)

    def timed(self) -> tuple[float, float]:
        reply = self.worker.request(op="call", name=self.name)
        return reply["wall"], reply["cpu"]


class Comparison:
    """Both sides' functions in one :func:`interleave` per measurement; every section runs once per side.

    The first side's pass measures both sides (interleaved) and keeps the other side's share, which the
    second pass reads back in the same order: sections stay ordinary single-side code.
    """

    SIDES = ("new", "old")

    def __init__(self, args, argv: list[str], srcs: dict[str, Path]):
        self.args, self.srcs = args, srcs
        self.workers: dict[str, Worker] = {}
        try:
            for side in self.SIDES:
                self.workers[side] = Worker(side, srcs[side], argv)
        except BaseException:
            self.close()
            raise
        self.kept: list[tuple[dict, dict]] = []
        self.timing: list[dict] = []  # one row per measurement and configuration: new/old

    def close(self):
        for w in self.workers.values():
            w.close()

    def side(self, side: str) -> ComparisonSide:
        return ComparisonSide(self, side)

    def measure_both(self, what: str, params: dict, *, repeats: int, warmup: int) -> tuple[dict, dict]:
        names = {side: w.request(op="prepare", what=what, params=params)["names"] for side, w in self.workers.items()}
        if names["new"] != names["old"]:
            raise RuntimeError(f"{what}: the two sides run different configurations: {names}")
        fns = {f"{side}:{n}": RemoteFn(self.workers[side], n) for side in self.SIDES for n in names[side]}
        times = interleave(fns, repeats=repeats, warmup=warmup, device=self.args.device)
        clocks = interleave.last
        for w in self.workers.values():
            w.request(op="release")
        batch, seq_len = OVERHEAD_SIZE if what == "overhead" else (self.args.batch, params["seq_len"])
        for n in names["new"]:
            self.timing.append({"section": what, "batch": batch, "seq_len": seq_len, "configuration": n,
                                "new_ms": med_ms(times[f"new:{n}"]), "old_ms": med_ms(times[f"old:{n}"]),
                                "new/old": paired(times, f"new:{n}", f"old:{n}")})
        split = {}
        for side in self.SIDES:
            def mine(d, side=side):
                return {k.split(":", 1)[1]: v for k, v in d.items() if k.startswith(side + ":")}
            split[side] = (mine(times), {clock: mine(v) for clock, v in clocks.items()})
        self.kept.append(split["old"])
        return split["new"]


class ComparisonSide:
    """What a section sees of a :class:`Comparison`: ``measure`` and the checkout for memory children."""

    def __init__(self, comparison: Comparison, side: str):
        self.comparison, self.side, self.src = comparison, side, comparison.srcs[side]

    def measure(self, what: str, params: dict, *, repeats: int, warmup: int) -> tuple[dict, dict]:
        if self.side == "new":
            return self.comparison.measure_both(what, params, repeats=repeats, warmup=warmup)
        return self.comparison.kept.pop(0)


def memory_comparison(new: dict, old: dict) -> list[dict]:
    rows = []
    for t, configs in new.items():
        if t.startswith("_"):  # _seconds
            continue
        for k, r in configs.items():
            o = old[t][k]
            rows.append({"seq_len": int(t), "configuration": k,
                         **{f"{f}_new": r[f] for f in ("peak_mb", "step_mb", "saved_for_backward_mb")},
                         **{f"{f}_old": o[f] for f in ("peak_mb", "step_mb", "saved_for_backward_mb")},
                         **{f"{f}_new/old": r[f] / o[f] if o[f] else None
                            for f in ("peak_mb", "step_mb", "saved_for_backward_mb")}})
    return rows


def compare_markdown(results: dict) -> str:
    src = results["sources"]
    lines = ["# perf.py --compare-src: this checkout (new) against another (old)", ""]
    for side in ("new", "old"):
        i = src[side]
        dirty = " (with uncommitted changes)" if i.get("uncommitted_changes") else ""
        lines.append(f"- **{side}**: `{i['blob_pyro']}`, commit {i.get('git_commit')}{dirty}, API {i['api']}, "
                     f"torch {i['torch']}, pyro {i['pyro']}")
    meta = results["meta"]
    clock = {"cpu": "process CPU time", "wall": "wall-clock time"}.get(meta.get("clock"), "?")
    lines += ["", f"Device: {meta.get('device_name', '?')}; {meta.get('threads')} thread(s); times are {clock} of "
              f"each side's worker; every round runs every configuration of both sides once in a fresh random "
              f"order; new/old is the median [quartiles] of the per-round ratio; 'within' means within "
              f"{100 * CLOSE:.0f} %.", "", f"Command: `{meta.get('command')}`", ""]
    timing = results["comparison"].get("timing", [])
    if timing:
        lines += ["**Time** (median ms)", "", "| section | size | configuration | new | old | new / old | within |",
                  "|---|---|---|---|---|---|---|"]
        for r in timing:
            p = r["new/old"]
            lines.append(f"| {r['section']} | B={r['batch']}, T={r['seq_len']} | {r['configuration']} | "
                         f"{r['new_ms']:.1f} | {r['old_ms']:.1f} | {p['median']:.3f} [{p['q1']:.2f}–{p['q3']:.2f}] | "
                         f"{'yes' if abs(p['median'] - 1) <= CLOSE else '**no**'} |")
        lines.append("")
    over = {s: results[s].get("overhead") for s in ("new", "old")}
    if over["new"] and over["old"]:
        lines += ["**Pyro + bookkeeping per step** (B=1, T=16; median of per-round differences, ms)", "",
                  "| | new | old |", "|---|---|---|",
                  f"| blob − blob_torch | {over['new']['pyro_ms_blob']:.1f} | {over['old']['pyro_ms_blob']:.1f} |",
                  f"| mle − lora_torch | {over['new']['pyro_ms_mle']:.1f} | {over['old']['pyro_ms_mle']:.1f} |", ""]
    memory = results["comparison"].get("memory", [])
    if memory:
        lines += ["**Memory** (MB; each configuration and side in a fresh process)", "",
                  "| T | configuration | peak new / old | step new / old | saved new / old | peak | step | saved | within |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in memory:
            ratios = [r[f"{f}_new/old"] for f in ("peak_mb", "step_mb", "saved_for_backward_mb")]
            ok = all(x is not None and abs(x - 1) <= CLOSE for x in ratios)
            lines.append(f"| {r['seq_len']} | {r['configuration']} | {r['peak_mb_new']:.0f} / {r['peak_mb_old']:.0f} | "
                         f"{r['step_mb_new']:.0f} / {r['step_mb_old']:.0f} | {r['saved_for_backward_mb_new']:.1f} / "
                         f"{r['saved_for_backward_mb_old']:.1f} | "
                         + " | ".join("–" if x is None else f"{x:.3f}" for x in ratios)
                         + f" | {'yes' if ok else '**no**'} |")
        lines.append("")
    for side in ("new", "old"):
        body = markdown(dict(results[side], meta=meta))
        lines += [f"## {side}", "", body.split("\n", 2)[2] if body.startswith("Device:") else body]
    return "\n".join(lines) + "\n"


def run_comparison(args, argv: list[str], sections: list[str], out_dir: Path, dev: str, log) -> int:
    srcs = {"new": SRC, "old": Path(args.compare_src).resolve()}
    if not (srcs["old"] / "blob_pyro" / "__init__.py").is_file():
        raise SystemExit(f"perf.py: error: --compare-src {args.compare_src} holds no blob_pyro/ package")
    suffix = "-quick" if args.quick else ""
    json_path, md_path = out_dir / f"perf-{dev}{suffix}-compare.json", out_dir / f"perf-{dev}{suffix}-compare.md"
    results = {"meta": meta_for(args, argv), "new": {}, "old": {}, "comparison": {}}
    comparison = Comparison(args, argv, srcs)
    try:
        results["sources"] = {side: w.info for side, w in comparison.workers.items()}
        for side in ("new", "old"):
            log(f"{side}: {results['sources'][side]['blob_pyro']} (commit {results['sources'][side]['git_commit']})")
        for section in sections:
            for side in Comparison.SIDES:  # "new" measures both sides; "old" reads its share
                t_section = time.perf_counter()
                results[side][section] = RUNNERS[section](args, lambda m, s=side: log(f"{s}: {m}"),
                                                          comparison.side(side))
                results[side][section]["_seconds"] = time.perf_counter() - t_section
            json_path.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        comparison.close()
    results["comparison"]["timing"] = comparison.timing
    if "memory" in sections:
        results["comparison"]["memory"] = memory_comparison(results["new"]["memory"], results["old"]["memory"])
    results["meta"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(compare_markdown({k: ({kk: {x: y for x, y in vv.items() if not x.startswith("_")}
                                              for kk, vv in v.items()} if k in ("new", "old") else v)
                                         for k, v in results.items()}))
    print(md_path.read_text())
    return 0


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
        with_compiled = [r for r in step.values() if "blob_compiled" in r["median_ms"]]
        if with_compiled:
            lines += ["With the network compiled (`--compiled`; same rounds):", "",
                      "| B | T | LoRA compiled | mle compiled | blob compiled | blob compiled / blob | mle compiled / mle | "
                      "LoRA compiled / LoRA (PyTorch) | blob compiled / LoRA (PyTorch) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in with_compiled:
                m = r["median_ms"]
                lines.append(f"| {r['batch']} | {r['seq_len']} | {m['lora_compiled']:.0f} | {m['mle_compiled']:.0f} | "
                             f"{m['blob_compiled']:.0f} | {pr(r, 'blob_compiled/blob')} | {pr(r, 'mle_compiled/mle')} | "
                             f"{pr(r, 'lora_compiled/lora_torch')} | {pr(r, 'blob_compiled/lora_torch')} |")
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
        for r in layer.values():
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
        lines += [f"**Prediction** (B={pred['batch']}, T={pred['seq_len']}, median ms; ratios are medians of per-round "
                  f"ratios)", "",
                  f"| plain LoRA forward | posterior mean (S=0) | S={pred['num_samples']} sequential | "
                  f"S={pred['num_samples']} sample-batched | sequential / mean | batched / mean | "
                  f"batched speed-up over sequential |",
                  "|---|---|---|---|---|---|---|",
                  f"| {m['lora_forward']:.0f} | {m['mean']:.0f} | {m['sequential']:.0f} | {m['batched']:.0f} | "
                  f"{pred['sequential_over_mean']:.2f} | {pred['batched_over_mean']:.2f} | {pred['batched_speedup']:.2f}× |", ""]
    if over:
        m = over["median_ms"]
        paper = "paper" in m  # measured since the restructure of 5cb28e0
        lines += [f"**Fixed per-step cost** (B={over['batch']}, T={over['seq_len']}: the network costs almost nothing; "
                  f"median ms; the last two columns are medians of per-round differences)", "",
                  "| LoRA (PyTorch) | mle (Pyro) | blob | " + ("paper preset | " if paper else "")
                  + "blob (plain PyTorch twin) | Pyro + bookkeeping, blob | Pyro + bookkeeping, mle |",
                  "|---|---|---|---|---|---|" + ("---|" if paper else ""),
                  f"| {m['lora_torch']:.1f} | {m['mle']:.1f} | {m['blob']:.1f} | "
                  + (f"{m['paper']:.1f} | " if paper else "")
                  + f"{m['blob_torch']:.1f} | {over['pyro_ms_blob']:.1f} | {over['pyro_ms_mle']:.1f} |", ""]
        ops = over.get("ops_per_step")
        comp = over.get("compiled_ratio")
        if comp:
            d, dc = over["compiled_over_lora_ms"], over["compiled_over_lora_compiled_ms"]
            lines += ["**Compiled network** (`--compiled`: plain LoRA with `torch.compile` of the PEFT network; mle and "
                      "blob with `compile=True`, the network part compiled and Pyro eager; same size, same rounds)", "",
                      "| LoRA compiled | mle compiled | blob compiled | blob compiled − LoRA (PyTorch) | "
                      "mle compiled − LoRA (PyTorch) | blob compiled / LoRA (PyTorch) | blob compiled / blob | "
                      "blob compiled − LoRA compiled |",
                      "|---|---|---|---|---|---|---|---|",
                      f"| {m['lora_compiled']:.1f} | {m['mle_compiled']:.1f} | {m['blob_compiled']:.1f} | "
                      f"{d['blob']:.1f} | {d['mle']:.1f} | {comp['blob_compiled/lora_torch']:.3f} | "
                      f"{comp['blob_compiled/blob']:.3f} | {dc['blob']:.1f} |", ""]
            if "blob_compiled_cpp" in m:  # measured since compile_cpp_wrapper
                lines += [f"With Inductor's C++ wrapper (`compile_cpp_wrapper=true`): blob {m['blob_compiled_cpp']:.1f} ms, "
                          f"{d['blob_cpp']:.1f} ms over LoRA (PyTorch), "
                          f"{comp['blob_compiled_cpp/lora_torch']:.3f} × LoRA (PyTorch), "
                          f"{comp['blob_compiled_cpp/blob_compiled']:.3f} × blob compiled.", ""]
        if ops:
            lines += ["**Operators per step** at the same size (aten operators not called inside another one, forward "
                      "and backward, from one profiled step; "
                      "in brackets the values read back to Python, a host sync each on a GPU when the "
                      "tensor lives there). A count does not depend on the machine's load.", "",
                      "| " + " | ".join(ops) + " |", "|" + "---|" * len(ops),
                      "| " + " | ".join(f"{c['ops']} ({c['scalar_reads']})" for c in ops.values()) + " |", ""]
    if sweep:
        lines += ["**Sweep** (median ms per step; saved-for-backward MB)", "",
                  "| B | T | LoRA layers | LoRA (PyTorch) | mle | blob | blob/mle | blob/LoRA | saved mle | saved blob | "
                  "saved blob/mle |",
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


RUNNERS = {"step": section_step, "memory": section_memory, "predict": section_predict,
           "overhead": section_overhead, "layer": section_layer, "sweep": section_sweep}


def meta_for(args, argv) -> dict:
    dev = torch.device(args.device).type
    name = (torch.cuda.get_device_name() if dev == "cuda"
            else f"CPU ({os.cpu_count()} cores visible, {platform.processor() or platform.machine()})")
    return {"device": args.device, "device_name": name, "torch": torch.__version__, "pyro": pyro.__version__,
            "clock": args.clock, "threads": torch.get_num_threads(), "model": args.model,
            "python": platform.python_version(), "command": "python benchmarks/perf.py " + " ".join(argv),
            "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", help=f"comma-separated, from {', '.join(SECTIONS)} (default: all; with --compare-src: "
                                      f"{', '.join(COMPARE_SECTIONS)})")
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
    p.add_argument("--compiled", action="store_true",
                   help="step and overhead sections: also plain LoRA, mle and blob with the network compiled (torch.compile)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON, measure nothing")
    p.add_argument("--compare-src", metavar="DIR",
                   help=f"also measure the blob_pyro of checkout DIR, interleaved with this one's, and report new/old "
                        f"ratios (sections {', '.join(COMPARE_SECTIONS)}; default: all four)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-memory", choices=SETUPS, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lora-layers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "cpu" if torch.device(args.device).type == "cpu" and torch.get_num_threads() == 1 else "wall"
    CLOCK["name"] = args.clock
    try:
        from blob_pyro.logs import quiet_library_logs
    except ImportError:  # a checkout from before 5cb28e0 (a --compare-src worker)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        quiet_library_logs()  # before PEFT (and bitsandbytes) is imported
    if args.child_memory:
        print(json.dumps(memory_child(args)))
        return 0
    if args.quick:
        args.batch, args.seq_lens, args.repeats, args.warmup, args.num_samples = 2, [16], 2, 1, 3
        args.sweep_base, args.sweep_batches, args.sweep_seq_lens, args.sweep_layers = [2, 16], [2], [16], [2, 12]
        args.sweep_repeats = 1
    if args.worker:
        return worker_main(args)
    default_sections = ",".join(COMPARE_SECTIONS if args.compare_src else SECTIONS)
    sections = [s.strip() for s in (args.sections or default_sections).split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.compare_src and [s for s in sections if s not in COMPARE_SECTIONS]:
        p.error(f"--compare-src compares the sections {', '.join(COMPARE_SECTIONS)}; got {', '.join(sections)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device).type
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    if args.compare_src:
        return run_comparison(args, argv, sections, out_dir, dev, log)
    suffix = "-quick" if args.quick else ""
    json_path, md_path = out_dir / f"perf-{dev}{suffix}.json", out_dir / f"perf-{dev}{suffix}.md"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.report_only:
        md_path.write_text(_report(results))
        print(md_path.read_text())
        return 0
    results["meta"] = dict(meta_for(args, argv), library=library_info())
    ctx = Local(args)
    for section in sections:
        t_section = time.perf_counter()
        results[section] = RUNNERS[section](args, log, ctx)
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
