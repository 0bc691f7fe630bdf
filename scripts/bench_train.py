"""Training throughput on this machine: activation generation and the SAE step, against a matmul peak.

    .venv/bin/python scripts/bench_train.py [--device cpu|cuda] [--gen-tokens 16384] [--steps 5]
    .venv/bin/python scripts/bench_train.py --only cache [--cache-tokens 50000]
    .venv/bin/python scripts/bench_train.py --only steps [--batch 4096] [--widths 8 32] [--act-fns relu topk]
    .venv/bin/python scripts/bench_train.py --only grouped [--cache-tokens 50000]
    .venv/bin/python scripts/bench_train.py --only forward [--cache-tokens 50000] [--rounds 1]
    .venv/bin/python scripts/bench_train.py --only syncs --device cuda [--d-model 2048] [--widths 8]
    .venv/bin/python scripts/bench_train.py --only profile [--act-fns topk] [--amp bfloat16] [--steps 5]

`--only steps` prints the trainer's SAE step for every act_fn, dense and sparse path, fp32 and bf16 autocast, at
each width, with each row's ratio to its variant's dense fp32 step and a bare PyTorch loop of the ReLU math
(on cuda also MFU against the GPU's bf16 peak); with topk among the act_fns, then where the sparse TopK step's
time goes, phase by phase, against one dense encoder matmul of the same shape (the bound of a sparse step).

Prints one table; `--only cache` prints only training tokens/s from an activation cache against on the fly
(`lm-saes train` defaults, relu 8x at blocks.6, the same tokens in the same order). Quote the ratios (fraction of peak, generation vs SAE step) together with the machine line;
absolute numbers only compare within one run on one machine.
`--only grouped` times a 4-job sweep (relu and topk k=32 at 8x and 16x) three ways: separate jobs on the fly,
one group (train_saes_together: one stream), and separate jobs from an activation cache (its generation
included); wall clock, model loads included.
`--only forward` times the model's forward alone to blocks.6 (interleaved call by call, `--steps` rounds), then
runs `lm-saes train +sae=relu_8x` (defaults, on the fly) three ways in one process: the forward
through TransformerBridge (the path before the residual fast path: `fast_residual=False`), the plain-HF residual
forward in fp32, and the same with `model.dtype=bfloat16`; the rounds interleave the three. It prints training
tokens/s (generation + SAE step, as the progress bar counts them), wall time with model load, EV and L0, each
with its ratio to the bridge's.
`--only syncs` (cuda) counts the host syncs of one trainer step (not a log step) for every act_fn, dense and
sparse path, by call site: torch's sync debug mode flags each op that makes the host wait for the GPU.
`--only profile` prints the ops of the sparse trainer step (dense for the act_fns without one) by self time on
the device, from torch.profiler, for each act_fn, autocast dtype and width.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lm_saes  # noqa: F401, I001  (before torch: it sets OpenMP's wait policy, which torch reads as it loads)
import torch
from rich.console import Console
from rich.table import Table

from lm_saes import (
    ActivationFactory,
    ActivationFactoryActivationsSource,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    DatasetConfig,
    GenerateSettings,
    LanguageModelConfig,
    SAEConfig,
    SparseAutoEncoder,
    TrainerConfig,
    TransformerLensLanguageModel,
    generate_activations,
    load_dataset,
    train_sae,
    train_saes_together,
)
from lm_saes.config_base import cpu_has_bf16_matmul
from lm_saes.sae.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes.sae.sparse_topk import row_topk


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` runs, after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: str, n: int, repeat: int) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device, repeat)


def sae_step(device: str, d_model: int, expansion: int, batch: int, repeat: int, act_fn: str = "relu",
             top_k: int = 32, sparse: bool = True) -> tuple[float, float]:
    """(tokens/s, executed FLOP/s) of one SAE training step: forward, backward, Adam."""
    cfg = SAEConfig(hook_point_in="x", d_model=d_model, expansion_factor=expansion, device=device, act_fn=act_fn,
                    top_k=top_k, sparse_topk=sparse)
    sae = SparseAutoEncoder(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d_model, device=device)

    def step() -> None:
        out = sae.compute_loss(x, x, sparsity_coefficient=1.0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    seconds = timed(step, device, repeat)
    encoder_forward = 2 * batch * d_model * cfg.d_sae
    if act_fn == "topk" and sparse:
        # Dense encoder forward; then four products over the k selected latents only: decoder forward, its two
        # gradients, and the encoder's weight gradient (as step_flops counts them).
        flops = encoder_forward + 4 * 2 * batch * top_k * d_model
    else:  # encoder and decoder forward, the decoder's two gradients, the encoder's weight gradient (x needs none)
        flops = 5 * encoder_forward
    return batch / seconds, flops / seconds


# --- the trainer's SAE step, every variant and path -------------------------------------------------------

SPARSE_PATHS = {"relu": "sparse_max_density", "jumprelu": "sparse_max_density", "batchtopk": "sparse_max_density",
                "topk": "sparse_topk"}
"""The act_fns with a sparse step, and the config key that switches it (the others step densely)."""

GPU_BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165}
"""Dense bf16 tensor-core peaks (no sparsity), by a name fragment of torch.cuda.get_device_name()."""


def trained_like(sae: SparseAutoEncoder, x_BD: torch.Tensor, l0: int) -> None:
    """Shift b_E so that about `l0` latents per token fire on `x`, as in a trained ReLU or JumpReLU SAE."""
    with torch.no_grad():
        pre = (x_BD[:512] @ sae.W_E).flatten().float()
        cut = float(pre.kthvalue(int(pre.numel() * (1 - l0 / sae.cfg.d_sae))).values)
        sae.b_E.fill_(-cut)
        if sae.cfg.act_fn == "jumprelu":
            sae.b_E.add_(sae.activation_function.threshold_S)


def trainer_case(device: str, d_model: int, expansion: int, batch: int, act_fn: str, sparse: bool, amp: str,
                 run_dir: str, l0: int = 48):  # noqa: ANN201
    """(sae, the trainer's run on it, a batch, the trainer config): a trained-like SAE (about `l0` latents fire
    per token; k=32 for the TopK family); a tiny lr keeps the state put."""
    from lm_saes.trainer import TrainingPlan, _Run

    key = SPARSE_PATHS.get(act_fn)
    on, off = (1.0, 1e-9) if key == "sparse_max_density" else (True, False)  # 1e-9: the switch decides dense
    cfg = SAEConfig(hook_point_in="x", d_model=d_model, expansion_factor=expansion, device=device, act_fn=act_fn,
                    top_k=32, matryoshka_prefixes=[0.25] if act_fn == "matryoshka_batchtopk" else None,
                    **({} if key is None else {key: on if sparse else off}))
    torch.manual_seed(0)
    sae = SparseAutoEncoder(cfg)
    x = torch.randn(batch, d_model, device=device)
    trained_like(sae, x, l0)
    tcfg = TrainerConfig(total_training_tokens=batch * 10_000, amp_dtype=amp, exp_result_path=run_dir, lr=1e-7,
                         l1_coefficient=1.0, log_frequency=10_000)
    run = _Run(tcfg, TrainingPlan.of(tcfg, batch), sae, iter([]), None, None, None)
    run.progress.close()
    return sae, run, {"x": x, "tokens": torch.zeros(batch, dtype=torch.long)}, tcfg


def trainer_step(device: str, d_model: int, expansion: int, batch: int, act_fn: str, sparse: bool, amp: str,
                 run_dir: str, l0: int = 48) -> tuple[Callable[[], None], Callable[[], float]]:
    """(one step, the selected latents per token) of the trainer's own step (lm_saes.trainer: loss, backward,
    Adam, the per-step metrics) on `trainer_case`'s SAE; the dense rows run the same state through the dense path."""
    sae, run, batch_dict, tcfg = trainer_case(device, d_model, expansion, batch, act_fn, sparse, amp, run_dir, l0)
    x = batch_dict["x"]

    def selected() -> float:
        with torch.autocast(device_type=torch.device(device).type, dtype=tcfg.amp_dtype,
                            enabled=tcfg.amp_dtype != torch.float32):
            out = sae.compute_loss(x, x, 1.0)
        # the entries the products read (JumpReLU also selects its window below the threshold, which they skip)
        return len(out.sparse.firing.cols_M) / batch if out.sparse is not None else float(out.l0())

    return lambda: run.record(run.step(batch_dict, batch, preempted=False)), selected


def bare_loop(device: str, d_model: int, expansion: int, batch: int) -> Callable[[], None]:
    """A plain PyTorch ReLU SAE step: the same math as lm_saes's (decoder-norm-weighted L1, Adam), written the
    obvious way, with no metrics."""
    torch.manual_seed(0)
    d_sae = d_model * expansion
    W_E = torch.nn.Parameter(torch.randn(d_model, d_sae, device=device) / d_model**0.5)
    W_D = torch.nn.Parameter(W_E.detach().T.clone())
    b_E = torch.nn.Parameter(torch.zeros(d_sae, device=device))
    b_D = torch.nn.Parameter(torch.zeros(d_model, device=device))
    optimizer = torch.optim.Adam([W_E, b_E, W_D, b_D], lr=1e-7)
    x = torch.randn(batch, d_model, device=device)

    def step() -> None:
        f = torch.relu(x @ W_E + b_E)
        loss = (f @ W_D + b_D - x).pow(2).sum(-1).mean() + (f * W_D.norm(dim=1)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def round_robin(fns: list[Callable[[], None]], device: str, repeat: int) -> list[float]:
    """Median seconds of each fn over `repeat` rounds, after one warm-up each; the rounds interleave the fns, so
    a load that drifts (a shared machine) moves every row alike and the ratios hold."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeat + 1):
        for fn, fn_times in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_:
                fn_times.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def step_flops(batch: int, d_model: int, d_sae: int, selected: float, sparse: bool) -> float:
    """Executed FLOPs of one step: the dense step's five products (encoder and decoder forward, the decoder's two
    gradients, the encoder's weight gradient); a sparse step's dense encoder forward plus four products over the
    selected latents."""
    if sparse:
        return 2 * batch * d_model * d_sae + 4 * 2 * batch * selected * d_model
    return 5 * 2 * batch * d_model * d_sae


def width_rows(device: str, d_model: int, expansion: int, batch: int, steps: int, act_fns: list[str],
               amps: list[str], run_dir: str) -> list[tuple[int, str, bool, str, float, float]]:
    """(width, act_fn, sparse, amp, tokens/s, latents/token) of every case at one width, and the bare loop's.

    On a CPU the cases of one act_fn (and the bare loop, with relu's) are timed interleaved, so their ratios
    hold while the load drifts; on a GPU, which nothing else shares, one case at a time, so that only one
    SAE (and its Adam state) is in memory."""
    rows = []
    for act_fn in act_fns:
        cases = [(act_fn, sparse, amp) for sparse in ((False, True) if act_fn in SPARSE_PATHS else (False,))
                 for amp in amps]
        groups = [cases] if device == "cpu" else [[case] for case in cases]
        for group in groups:
            built = [trainer_step(device, d_model, expansion, batch, *case, run_dir) for case in group]
            bare = [bare_loop(device, d_model, expansion, batch)] if act_fn == "relu" and group is groups[-1] else []
            seconds = round_robin([step for step, _ in built] + bare, device, steps)
            rows += [(expansion, *case, batch / sec, selected()) for case, (_, selected), sec in zip(group, built, seconds)]
            if bare:
                rows.append((expansion, "bare PyTorch loop (relu)", False, "float32", batch / seconds[-1], float("nan")))
            del built, bare
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


TOPK_PHASES = ("encoder matmul x W_E + b_E (the bound)", "+ top-k (sparse_topk.row_topk)", "forward (compute_loss)",
               "+ backward", "+ Adam and the unit-norm decoder", "trainer step (+ per-step metrics)")
"""`topk_phases`' cumulative timings, each one a prefix of the next."""


def topk_phases(device: str, d_model: int, expansion: int, batch: int, steps: int, run_dir: str) -> list[float]:
    """Seconds of each of TOPK_PHASES for the sparse TopK step (k=32, fp32), timed interleaved in one run: each
    phase runs everything before it too, so the differences are what each phase adds."""
    sae, run, batch_dict, _ = trainer_case(device, d_model, expansion, batch, "topk", True, "float32", run_dir)
    x, k = batch_dict["x"], sae.activation_function.k
    out_BS = torch.empty(batch, sae.cfg.d_sae, device=device)  # as the step's own, which reuses its buffer

    def matmul() -> torch.Tensor:
        with torch.no_grad():
            return torch.addmm(sae.b_E, x, sae.W_E, out=out_BS)

    def forward():  # noqa: ANN202
        run.optimizer.zero_grad(set_to_none=True)
        return sae.compute_loss(x, x, 1.0, dead_S=run.state.tokens_since_fired_S >= run.plan.dead_window)

    def adam() -> None:
        forward().loss.backward()
        sae.before_optimizer_step()
        run.optimizer.step()
        sae.after_optimizer_step()

    return round_robin([matmul, lambda: row_topk(matmul(), k), forward,
                        lambda: forward().loss.backward(), adam,
                        lambda: run.record(run.step(batch_dict, batch, preempted=False))], device, steps)


def print_topk_phases(device: str, d_model: int, widths: list[int], batch: int, steps: int, run_dir: str) -> None:
    table = Table(title=f"Where the sparse TopK step's time goes (k=32, fp32, d_model {d_model}, batch {batch}): "
                        "cumulative phases, interleaved in one run")
    for col in ("width", "phase", "ms", "x matmul", "phase adds (ms)"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for expansion in widths:
        seconds = topk_phases(device, d_model, expansion, batch, steps, run_dir)
        for i, (phase, sec) in enumerate(zip(TOPK_PHASES, seconds)):
            table.add_row(f"{expansion}x", phase, f"{sec * 1e3:,.0f}", f"{sec / seconds[0]:.2f}",
                          f"{(sec - seconds[i - 1]) * 1e3:,.0f}" if i else "")
    Console(width=170).print(table)


def print_step_table(device: str, d_model: int, widths: list[int], batch: int, steps: int, act_fns: list[str],
                     amps: list[str], peak_tflops: float | None) -> None:
    rows: list[tuple[int, str, bool, str, float, float]] = []
    with tempfile.TemporaryDirectory() as run_dir:  # the trainer writes nothing there without checkpoints
        for expansion in widths:  # one width at a time: all of its SAEs are in memory together
            rows += width_rows(device, d_model, expansion, batch, steps, act_fns, amps, run_dir)
    dense_fp32 = {(e, a): tps for e, a, sparse, amp, tps, _ in rows if not sparse and amp == "float32"}
    peak = f"MFU (of {peak_tflops:.0f} TFLOP/s bf16)" if peak_tflops else None
    table = Table(title=f"SAE training step, d_model {d_model}, batch {batch}, median of {steps} interleaved rounds, "
                        f"on {machine(device)}")
    for col in ("width", "act_fn", "path", "autocast", "tokens/s", "x dense fp32", "latents/token", *([peak] if peak else [])):
        table.add_column(col, justify="left" if col in ("act_fn", "path") else "right")
    for expansion, act_fn, sparse, amp, tps, selected in rows:
        base = dense_fp32.get((expansion, "relu" if act_fn.startswith("bare") else act_fn))
        known = selected == selected  # not NaN
        flops = step_flops(batch, d_model, d_model * expansion, selected, sparse) if known else 0.0
        mfu = [f"{flops * tps / batch / (peak_tflops * 1e12):.2f}" if flops else ""] if peak_tflops else []
        table.add_row(f"{expansion}x", act_fn, "sparse" if sparse else "dense", "bf16" if amp == "bfloat16" else "fp32",
                      f"{tps:,.0f}", f"{tps / base:.2f}" if base else "", f"{selected:.0f}" if known else "", *mfu)
    Console(width=170).print(table)
    if "topk" in act_fns:
        with tempfile.TemporaryDirectory() as run_dir:
            print_topk_phases(device, d_model, widths, batch, steps, run_dir)


def step_syncs(device: str, d_model: int, expansion: int, batch: int, act_fn: str, sparse: bool,
               run_dir: str) -> Counter[str]:
    """The host syncs of one fp32 trainer step (not a log step), by call site ("file:line"), after two warm-up
    steps: torch's sync debug mode warns at every op that makes the host wait for the GPU (`.item()`,
    `nonzero`, a copy to the host). On a CPU nothing is flagged, and the count is 0."""
    step, _ = trainer_step(device, d_model, expansion, batch, act_fn, sparse, "float32", run_dir)
    step()
    step()
    sync(device)
    sites: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if "synchroniz" in str(message):
            sites[call_site(filename, lineno)] += 1

    with warnings.catch_warnings():  # restores showwarning on leaving the block
        warnings.simplefilter("always")
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("warn")  # its own first call warns too: not a sync, so not counted
        warnings.showwarning = record
        try:
            step()
        finally:
            warnings.showwarning = lambda *args, **kwargs: None
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sites


def call_site(filename: str, lineno: int) -> str:
    """"file:line" of the innermost lm_saes frame on the stack (where the sync was asked for), followed by the
    frame the warning names when that is outside lm_saes (the torch function that synced)."""
    stack = traceback.extract_stack()
    ours = next((f for f in reversed(stack) if f"{os.sep}lm_saes{os.sep}" in f.filename), None)
    named = f"{Path(filename).name}:{lineno}"
    if ours is None:  # the innermost frames, to find who called
        return " < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                          for f in reversed(stack[-7:-2]))  # less this and `record`
    site = f"{Path(ours.filename).name}:{ours.lineno}"
    return site if f"{os.sep}lm_saes{os.sep}" in filename else f"{site} ({named})"


def print_profile(device: str, d_model: int, widths: list[int], batch: int, steps: int, act_fns: list[str],
                  amps: list[str], top: int = 12) -> None:
    """Where one sparse trainer step's time goes, by kernel (torch.profiler over `steps` steps after two warm-up
    ones): the `top` ops by self time on the device (CUDA kernels on a GPU, CPU ops on a CPU), each case in turn."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with tempfile.TemporaryDirectory() as run_dir:
        for expansion in widths:
            for act_fn in act_fns:
                for amp in amps:
                    step, _ = trainer_step(device, d_model, expansion, batch, act_fn, act_fn in SPARSE_PATHS, amp,
                                           run_dir)
                    step()
                    step()
                    sync(device)
                    start = time.perf_counter()
                    with profile(activities=activities) as prof:
                        for _ in range(steps):
                            step()
                        sync(device)
                    ms = (time.perf_counter() - start) / steps * 1e3
                    print(f"\n=== {expansion}x {act_fn} sparse {amp}: {ms:.2f} ms per step under the profiler "
                          f"(d_model {d_model}, batch {batch}, {steps} steps; times below are totals over them)")
                    print(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=60))
                    del step
                    if cuda:
                        torch.cuda.empty_cache()


def print_sync_table(device: str, d_model: int, widths: list[int], batch: int, act_fns: list[str]) -> None:
    table = Table(title=f"Host syncs in one trainer step (fp32, not a log step), d_model {d_model}, batch {batch}, "
                        f"on {machine(device)}")
    for col in ("width", "act_fn", "path", "syncs per step", "where (file:line x count)"):
        table.add_column(col, justify="right" if col in ("width", "syncs per step") else "left")
    with tempfile.TemporaryDirectory() as run_dir:
        for expansion in widths:
            for act_fn in act_fns:
                for sparse in (False, True) if act_fn in SPARSE_PATHS else (False,):
                    sites = step_syncs(device, d_model, expansion, batch, act_fn, sparse, run_dir)
                    table.add_row(f"{expansion}x", act_fn, "sparse" if sparse else "dense", str(sum(sites.values())),
                                  ", ".join(f"{site} x{n}" for site, n in sites.most_common()))
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
    Console(width=170).print(table)


def gpu_peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_BF16_PEAK_TFLOPS.items() if key in name), None)


def activation_generation(device: str, n_tokens: int, hook: str) -> float:
    """Tokens/s of the ActivationFactory on the embedded SmolLM2 and built-in corpus (no shuffle)."""
    model = TransformerLensLanguageModel(LanguageModelConfig(device=device))
    cfg = ActivationFactoryConfig(sources=[ActivationFactoryDatasetSource(name="docs")], hook_points=[hook],
                                  batch_size=1024, context_size=256, model_batch_size=8)
    stream = ActivationFactory(cfg).process(model=model, model_name="smollm2", datasets={"docs": load_dataset(DatasetConfig())})
    next(stream)  # warm-up: first forward passes, tokenizer start-up
    sync(device)
    start, seen = time.perf_counter(), 0
    for batch in stream:
        seen += len(batch["tokens"])
        if seen >= n_tokens:
            break
    sync(device)
    return seen / (time.perf_counter() - start)


def cache_vs_on_the_fly(device: str, n_tokens: int) -> tuple[float, float, float]:
    """(generate, train from the cache, train on the fly) tokens/s: `lm-saes train +sae=relu_8x` settings on the
    embedded SmolLM2 and built-in corpus, differing only in the source. Training tokens/s is the trainer's own
    (after the initializer), so on the fly it includes the model's forward passes and from the cache the reads."""
    from lm_saes.cli.compose import compose_single_run
    from lm_saes.cli.verbs import settings_from_config
    from lm_saes.runners.held_out import tokens_read_by_training

    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["+sae=relu_8x", f"trainer.total_training_tokens={n_tokens}", f"device={device}"]
        fly = settings_from_config(compose_single_run(overrides), run_dir=str(Path(tmp) / "fly"))
        # The cache holds every token the on-the-fly run reads (budget, initializer, buffer), in the same order.
        gen = GenerateSettings(
            output_dir=str(Path(tmp) / "acts"), model=fly.model, datasets=fly.datasets,
            hook_points=fly.activation_factory.hook_points, context_size=fly.activation_factory.context_size,
            model_batch_size=fly.activation_factory.model_batch_size, total_tokens=tokens_read_by_training(fly),
        )
        start = time.perf_counter()
        manifest = generate_activations(gen)
        gen_tps = manifest.n_rows / (time.perf_counter() - start)
        cached = fly.model_copy(deep=True)
        cached.activation_factory.sources = [ActivationFactoryActivationsSource(path=gen.output_dir)]
        cached.trainer.exp_result_path = str(Path(tmp) / "cached")
        from_cache = _training_tokens_per_second(cached)
        on_the_fly = _training_tokens_per_second(fly)
    return gen_tps, from_cache, on_the_fly


def _training_tokens_per_second(settings) -> float:  # noqa: ANN001
    import json

    train_sae(settings)
    return json.loads((Path(settings.trainer.exp_result_path) / "metrics.json").read_text())["tokens_per_second"]


def print_cache_table(device: str, n_tokens: int) -> None:
    gen_tps, from_cache, on_the_fly = cache_vs_on_the_fly(device, n_tokens)
    table = Table(title=f"lm_saes training from an activation cache vs on the fly, {n_tokens:,} tokens, on {machine(device)}")
    for col in ("stage", "tokens/s"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    table.add_row("generate the cache: SmolLM2-135M to blocks.6, ctx 256 (with model load)", f"{gen_tps:,.0f}")
    table.add_row("train relu 8x, batch 1024, buffer 8192: on the fly", f"{on_the_fly:,.0f}")
    table.add_row("train relu 8x, batch 1024, buffer 8192: from the cache", f"{from_cache:,.0f} "
                  f"({from_cache / on_the_fly:.1f}x on the fly)")
    Console(width=140).print(table)


def sweep_jobs(device: str, n_tokens: int, root: Path, source: str | None = None) -> list:  # noqa: ANN001
    """The 4-job sweep's settings (`lm-saes train` defaults otherwise), run directories under `root`; with
    `source`, training reads that activation cache."""
    from lm_saes.cli.compose import compose_single_run
    from lm_saes.cli.verbs import settings_from_config

    jobs = []
    for act_fn in ("relu", "topk"):
        for expansion in (8, 16):
            overrides = ["+sae=relu_8x", f"sae.act_fn={act_fn}", f"sae.expansion_factor={expansion}",
                         "++sae.top_k=32", f"trainer.total_training_tokens={n_tokens}", f"device={device}"]
            settings = settings_from_config(compose_single_run(overrides), run_dir=str(root / f"{act_fn}_{expansion}x"))
            if source is not None:
                settings.activation_factory.sources = [ActivationFactoryActivationsSource(path=source)]
            jobs.append(settings)
    return jobs


def grouped_vs_separate(device: str, n_tokens: int) -> dict[str, float]:
    """Wall seconds of the 4-job sweep: separate jobs on the fly, one group, separate jobs from a cache."""
    from lm_saes.runners.held_out import tokens_read_by_training

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        for settings in sweep_jobs(device, n_tokens, root / "separate"):
            train_sae(settings)
        times["separate"] = time.perf_counter() - start
        start = time.perf_counter()
        outcomes = train_saes_together(sweep_jobs(device, n_tokens, root / "grouped"))
        times["grouped"] = time.perf_counter() - start
        assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
        first = sweep_jobs(device, n_tokens, root / "unused")[0]
        gen = GenerateSettings(
            output_dir=str(root / "acts"), model=first.model, datasets=first.datasets,
            hook_points=first.activation_factory.hook_points, context_size=first.activation_factory.context_size,
            model_batch_size=first.activation_factory.model_batch_size, total_tokens=tokens_read_by_training(first),
        )
        start = time.perf_counter()
        generate_activations(gen)
        times["generate"] = time.perf_counter() - start
        for settings in sweep_jobs(device, n_tokens, root / "cached", source=gen.output_dir):
            train_sae(settings)
        times["cached"] = time.perf_counter() - start
    return times


def print_grouped_table(device: str, n_tokens: int) -> None:
    times = grouped_vs_separate(device, n_tokens)
    table = Table(title=f"lm_saes 4-job sweep (relu, topk k=32; 8x, 16x), {n_tokens:,} tokens each, on {machine(device)}")
    for col in ("way", "wall s", "vs separate"):
        table.add_column(col, justify="right" if col != "way" else "left")
    table.add_row("separate jobs, on the fly (4 model loads, 4 streams)", f"{times['separate']:,.1f}", "1.00")
    for key, label in (("grouped", "one group, on the fly (1 model load, 1 stream)"),
                       ("cached", f"separate jobs from a cache (generation {times['generate']:,.1f} s included)")):
        table.add_row(label, f"{times[key]:,.1f}", f"{times[key] / times['separate']:.2f}")
    Console(width=140).print(table)


FORWARD_WAYS = (("TransformerBridge forward (before)", False, "float32"), ("plain-HF residual forward", True, "float32"),
                ("plain-HF residual forward", True, "bfloat16"))
"""(label, fast_residual, model.dtype) of `--only forward`'s rows; the first is the reference."""


def forward_run(device: str, n_tokens: int, run_dir: Path, fast_residual: bool, dtype: str) -> dict[str, float]:
    """Training tokens/s, wall seconds (model load included), EV and L0 of one `lm-saes train +sae=relu_8x` run."""
    import functools
    import json
    from unittest import mock

    from lm_saes.cli.compose import compose_single_run
    from lm_saes.cli.verbs import settings_from_config

    overrides = ["+sae=relu_8x", f"trainer.total_training_tokens={n_tokens}", f"device={device}", f"model.dtype={dtype}"]
    settings = settings_from_config(compose_single_run(overrides), run_dir=str(run_dir))
    model_class = functools.partial(TransformerLensLanguageModel, fast_residual=fast_residual)
    start = time.perf_counter()
    with mock.patch("lm_saes.runners.train.TransformerLensLanguageModel", model_class):
        train_sae(settings)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"tps": metrics["tokens_per_second"], "wall": wall, "ev": metrics["explained_variance"], "l0": metrics["l0"]}


def forward_alone(device: str, repeat: int, ways: tuple[tuple[str, bool, str], ...],
                  hook: str = "blocks.6.hook_resid_post") -> list[float]:
    """Tokens/s of the model's forward alone to `hook` (8 contexts of 256 tokens of the built-in corpus), for each
    of `ways` (FORWARD_WAYS' rows), timed interleaved call by call (`round_robin`)."""
    from lm_saes.activation.packing import pack_documents

    models = {dtype: TransformerLensLanguageModel(LanguageModelConfig(device=device, dtype=dtype))
              for dtype in dict.fromkeys(dtype for _, _, dtype in ways)}
    texts = (row["text"] for row in load_dataset(DatasetConfig()))
    tokens_BT = torch.stack([c for _, c in zip(range(8), pack_documents(texts, models["float32"].tokenizer, 256))])

    def forward(fast: bool, dtype: str) -> Callable[[], None]:
        model = models[dtype]
        residual = model.residual

        def run() -> None:
            model.residual = residual if fast else None
            model.run_hooks(tokens_BT, [hook])
            model.residual = residual
        return run

    seconds = round_robin([forward(fast, dtype) for _, fast, dtype in ways], device, repeat)
    return [tokens_BT.numel() / sec for sec in seconds]


def print_forward_table(device: str, n_tokens: int, rounds: int, repeat: int,
                        ways: tuple[tuple[str, bool, str], ...] = FORWARD_WAYS) -> None:
    alone = forward_alone(device, repeat, ways)
    results: list[list[dict[str, float]]] = [[] for _ in ways]
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for i, (_, fast, dtype) in enumerate(ways):
                results[i].append(forward_run(device, n_tokens, Path(tmp) / f"{round_}-{i}", fast, dtype))
    median = [{k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]} for runs in results]
    table = Table(title=f"lm-saes train +sae=relu_8x end to end (SmolLM2-135M to blocks.6, on the fly), {n_tokens:,} "
                        f"tokens, median of {rounds} interleaved round(s), on {machine(device)}")
    for col in ("forward", "model dtype", "forward alone tok/s", "x before", "train tokens/s", "x before",
                "wall s (with load)", "x before", "EV", "L0"):
        table.add_column(col, justify="left" if col in ("forward", "model dtype") else "right")
    base = median[0]
    for (label, _, dtype), row, fwd in zip(ways, median, alone):
        table.add_row(label, dtype, f"{fwd:,.0f}", f"{fwd / alone[0]:.2f}", f"{row['tps']:,.0f}",
                      f"{row['tps'] / base['tps']:.2f}", f"{row['wall']:,.1f}", f"{base['wall'] / row['wall']:.2f}",
                      f"{row['ev']:.3f}", f"{row['l0']:.1f}")
    Console(width=170).print(table)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gen-tokens", type=int, default=16384, help="tokens of activation generation to time")
    parser.add_argument("--steps", type=int, default=5, help="timed repeats of the SAE step and the matmul")
    parser.add_argument("--matmul-n", type=int, default=4096, help="size of the square matmul that sets the peak")
    parser.add_argument("--only", choices=("all", "cache", "steps", "grouped", "forward", "syncs", "profile"), default="all",
                        help="cache: only training from an activation cache vs on the fly; steps: only the SAE step "
                             "table; grouped: only the 4-job sweep as separate jobs, one group, and from a cache; "
                             "forward: only lm-saes train end to end with the bridge's forward, the plain one, bf16; "
                             "syncs: only the host syncs per trainer step, by call site (cuda); "
                             "profile: the ops of the sparse trainer step by self time (torch.profiler)")
    parser.add_argument("--cache-tokens", type=int, default=50_000,
                        help="training tokens for the cache, grouped and forward comparisons")
    parser.add_argument("--rounds", type=int, default=1, help="forward: interleaved rounds of the three runs")
    parser.add_argument("--d-model", type=int, default=576, help="steps: the SAE's input width")
    parser.add_argument("--batch", type=int, default=4096, help="steps: rows per step")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 32], help="steps: expansion factors")
    parser.add_argument("--act-fns", nargs="+", default=sorted(ACTIVATION_FUNCTIONS), help="steps: variants")
    parser.add_argument("--amp", nargs="+", default=None,
                        help="steps: trainer.amp_dtype values (default: float32 bfloat16; float32 alone on a CPU "
                             "without bf16 matrix kernels, where an 8x bf16 encoder product took 120x the fp32 one)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="steps on cuda: the GPU's dense bf16 peak for MFU (default: looked up by device name)")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "bench_train.py: --device cuda but torch sees no CUDA device\n")
    slow_bf16 = torch.device(device).type == "cpu" and not cpu_has_bf16_matmul()
    if slow_bf16 and args.only in ("all", "steps", "forward") and (args.amp is None or args.only == "forward"):
        print(f"bf16 rows left out: this CPU has no bf16 matrix kernels (torch's CPU capability: "
              f"{torch.backends.cpu.get_cpu_capability()}), so they would take hours; "
              "--amp bfloat16 runs the step rows anyway")
    args.amp = args.amp or (["float32"] if slow_bf16 else ["float32", "bfloat16"])
    if args.only == "cache":
        print_cache_table(device, args.cache_tokens)
        return
    if args.only == "steps":
        print_step_table(device, args.d_model, args.widths, args.batch, args.steps, args.act_fns, args.amp,
                         args.peak_tflops or gpu_peak_tflops(device))
        return
    if args.only == "profile":
        print_profile(device, args.d_model, args.widths, args.batch, args.steps, args.act_fns, args.amp)
        return
    if args.only == "syncs":
        if not device.startswith("cuda"):
            parser.exit(2, "bench_train.py: --only syncs counts GPU host syncs; it needs --device cuda\n")
        print_sync_table(device, args.d_model, args.widths, args.batch, args.act_fns)
        return
    if args.only == "grouped":
        print_grouped_table(device, args.cache_tokens)
        return
    if args.only == "forward":
        ways = tuple(way for way in FORWARD_WAYS if not (slow_bf16 and way[2] == "bfloat16"))
        print_forward_table(device, args.cache_tokens, args.rounds, args.steps, ways)
        return

    peak = matmul_peak(device, args.matmul_n, args.steps)
    sae_tps, sae_flops = sae_step(device, 576, 8, 4096, args.steps)
    topk_rows = []
    for expansion in (8, 32, 64):
        for sparse in (False, True):
            tps, flops = sae_step(device, 576, expansion, 4096, args.steps, act_fn="topk", sparse=sparse)
            topk_rows.append((expansion, sparse, tps, flops))
    gen_tps = activation_generation(device, args.gen_tokens, "blocks.6.hook_resid_post")

    table = Table(title=f"lm_saes training throughput on {machine(device)}")
    for col in ("stage", "tokens/s", "GFLOP/s executed", "fraction of matmul peak"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    table.add_row(f"matmul {args.matmul_n}^3 fp32 (peak)", "", f"{peak / 1e9:,.1f}", "1.00")
    table.add_row("SAE step: dense ReLU, d_model 576, 8x, batch 4096", f"{sae_tps:,.0f}", f"{sae_flops / 1e9:,.1f}",
                  f"{sae_flops / peak:.2f}")
    dense_tps = {}
    for expansion, sparse, tps, flops in topk_rows:
        if not sparse:
            dense_tps[expansion] = tps
        speedup = f" ({tps / dense_tps[expansion]:.1f}x dense)" if sparse else ""
        table.add_row(f"SAE step: topk k=32, {expansion}x, batch 4096, {'sparse' if sparse else 'dense'} path",
                      f"{tps:,.0f}{speedup}", f"{flops / 1e9:,.1f}", f"{flops / peak:.2f}")
    table.add_row("activation generation: SmolLM2-135M to blocks.6, ctx 256", f"{gen_tps:,.0f}", "", "")
    console = Console(width=140)  # keep the table on one line per row in logs and pipes
    console.print(table)
    console.print(f"SAE step / generation throughput ratio: {sae_tps / gen_tps:.1f}x")
    print_cache_table(device, args.cache_tokens)


if __name__ == "__main__":
    main()
