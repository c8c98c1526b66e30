"""The plumbing of a training run: processes, seeds and batch order, the run folder, budgets, progress.

None of this is the learning itself (that is `steps.py`); it is what makes a run a reliable job:

    Dist, init_distributed      one process or several under torchrun (DDP: gloo on CPU, nccl on CUDA)
    step_generator              all randomness of step s comes from a generator seeded with (seed, s)
    global_batch_indices        the data order depends only on (seed, step): resumes replay it exactly
    lr_factor                   linear warm-up, then cosine decay over the budget
    Run                         the run folder: config.json, metrics.jsonl, loss.png, state files,
                                every write atomic and on the main process only
    Budget                      steps or wall-clock minutes, with time kept for the final save
    StopRequest, STOP           Ctrl-C / SIGTERM finish the step and save a resumable state

Everything takes plain arguments (numbers, paths, dicts), not a training config.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during a training loop: finish the current step, save a resumable
    state, then stop. Outside a loop, or at the second signal, they interrupt at once as usual."""

    def __init__(self):
        self.signal: Optional[str] = None        # the name of the signal that asked to stop
        self.armed = False                       # inside a loop that can save its state
        self.saved: Optional[str] = None         # what the stopped stage wrote, for the final message

    def install(self) -> None:
        def handler(signum, frame):
            if not self.armed or self.signal is not None:
                raise KeyboardInterrupt
            self.signal = signal.Signals(signum).name
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None


STOP = StopRequest()


# ----------------------------------------------------------------------------------------------
# Processes, devices, randomness


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def process_device(name: str, dist: Dist) -> torch.device:
    """The device this process trains on: `name` ("cpu", "cuda", "cuda:N"); with several processes,
    plain "cuda" means the process's own GPU (torchrun's LOCAL_RANK)."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is available; use --device cpu")
        if dist.world > 1 and name == "cuda":
            return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def step_generator(seed: int, step: int, stage: str, rank: int = 0) -> torch.Generator:
    """The generator all randomness of one training step is drawn from."""
    stage_id = {"vae": 1, "ldm": 2, "scale": 3, "cache": 4}[stage]
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 8 + stage_id) * 4099 + rank)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The data indices of step `step`: consecutive slices of per-epoch permutations (last partial
    batch of an epoch dropped), so the order depends only on (seed, step)."""
    per_epoch = max(1, n // batch_size)
    epoch, j = divmod(step, per_epoch)
    perm = epoch_permutation(n, seed, epoch)
    if n < batch_size:  # tiny data sets: wrap around
        return perm.repeat(batch_size // n + 1)[:batch_size]
    return perm[j * batch_size:(j + 1) * batch_size]


def lr_factor(step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from 1 to `min_ratio` as progress goes 0 -> 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Run folder: config, metrics, plots, checkpoints


class Run:
    """Files of one run; every write happens on the main process only."""

    def __init__(self, run_dir: str, main: bool = True):
        self.dir = Path(run_dir)
        self.main = main
        if main:
            (self.dir / "samples").mkdir(parents=True, exist_ok=True)

    @property
    def model_path(self) -> Path:
        return self.dir / "model.safetensors"

    @property
    def vae_path(self) -> Path:
        return self.dir / "vae.safetensors"

    def state_path(self, stage: str) -> Path:
        return self.dir / f"state_{stage}.pt"

    def write_config(self, config: dict) -> None:
        if self.main:
            atomic_write_text(self.dir / "config.json", json.dumps(config, indent=2) + "\n")

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def metrics(self) -> list:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, stage: str, step: int) -> None:
        """Forget records of `stage` after `step` (a resumed run logs them again)."""
        if not self.main:
            return
        kept = [r for r in self.metrics() if r.get("stage") != stage or r["step"] <= step]
        atomic_write_text(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def plot_losses(self) -> None:
        if self.main:
            plot_losses(self.metrics(), self.dir / "loss.png")

    def save_state(self, stage: str, state: dict) -> None:
        if self.main:
            path = self.state_path(stage)
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)

    def load_state(self, stage: str) -> Optional[dict]:
        path = self.state_path(stage)
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_losses(records: list, path) -> None:
    """One panel per stage: the logged loss against the step, with a smoothed curve. Drawn on a bare
    matplotlib Figure, not through pyplot: saving a file must not change the backend of a notebook that
    trains (pictures shown there afterwards would silently stop appearing)."""
    from matplotlib.figure import Figure

    stages = [s for s in ("vae", "ldm") if any(r.get("stage") == s for r in records)]
    if not stages:
        return
    fig = Figure(figsize=(5 * len(stages), 3.2))
    axes = fig.subplots(1, len(stages), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r.get("stage") == stage and "loss" in r]
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        if len(losses) > 4:
            k = max(2, len(losses) // 20)
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of last {k}")
        ax.set_title({"vae": "stage 1: VAE (rec + KL)", "ldm": "stage 2: noise prediction (MSE)"}[stage])
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------
# Budgets, progress, several processes


def autocast(amp: bool, device: torch.device):
    """Mixed precision when asked for: on CUDA in bfloat16 where the GPU has it, else float16; on a CPU in
    bfloat16. The weights, the optimizer and the loss stay float32; only the matrix products and
    convolutions run in the smaller type."""
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if amp and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (Intel AMX or AVX512-BF16). Only then is CPU
    autocast a gain: elsewhere PyTorch emulates bfloat16 and the same step takes longer."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def check_finite(loss: torch.Tensor, stage: str, step: int, run: Run, last_saved: Optional[int]):
    if not torch.isfinite(loss).all():
        kept = (f"the last good checkpoint (step {last_saved}) is kept in {run.dir}" if last_saved is not None
                else "no checkpoint was written yet")
        raise TrainingDiverged(f"{stage} loss became {loss.item()} at step {step}; training stopped and "
                               f"{kept}. Try a lower learning rate, --grad-clip, or float32.")


class Budget:
    """Stops a stage at max_steps or when max_minutes (summed over resumes) have passed.

    The clock runs from `started` (a time.perf_counter() value, default now), so work done before the
    loop, like loading the data or caching latents, is paid from the same budget.
    """

    def __init__(self, max_steps: Optional[int], max_minutes: Optional[float], elapsed: float = 0.0,
                 started: Optional[float] = None):
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.start = (time.perf_counter() if started is None else started) - elapsed
        self.costs: dict = {}  # seconds the work after the last step takes (a save, a sample grid), as measured

    @contextlib.contextmanager
    def reserving(self, name: str):
        """Time a piece of work the stage also does after its last step, and keep that much time for it."""
        began = time.perf_counter()
        yield
        self.costs[name] = time.perf_counter() - began

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        p = 0.0 if self.max_steps is None else step / max(1, self.max_steps)
        if self.max_minutes:
            p = max(p, self.elapsed / (60 * self.max_minutes))
        return p

    def left(self) -> str:
        """Wall-clock time left in the minutes budget, for the progress bar ('' without one)."""
        if not self.max_minutes:
            return ""
        seconds = max(0, int(60 * self.max_minutes - self.elapsed))
        return f"{seconds // 60}:{seconds % 60:02d}"

    def done(self, step: int, dist: Dist) -> bool:
        stop = self.reached(step) or STOP.requested
        if dist.world > 1:  # every process must stop at the same step
            import torch.distributed as tdist
            flag = torch.tensor([1.0 if stop else 0.0])
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def reached(self, step: int) -> bool:
        """Whether the step count or the minutes are used up (on this process)."""
        reserve = sum(self.costs.values())  # so that the final save and grid end within the minutes too
        return ((self.max_steps is not None and step >= self.max_steps) or
                (self.max_minutes is not None and self.elapsed + reserve >= 60 * self.max_minutes))


def training_steps(budget: Budget, dist: Dist, step: int, *, seed: int, stage: str, n: int, batch_size: int):
    """The steps of a training loop from `step` on, until the budget is used up or a stop was asked for:
    (step, the generator of all its randomness, its data indices). Ctrl-C and SIGTERM wait meanwhile
    for the step to finish (STOP is armed)."""
    STOP.armed = True
    while not budget.done(step, dist):
        yield step, step_generator(seed, step, stage), global_batch_indices(n, batch_size, seed, step)
        step += 1


def progress_bar(total: Optional[int], desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                unit="step", smoothing=0.1)


def mean_over_processes(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world == 1:
        return value
    import torch.distributed as tdist
    value = value.detach().clone()
    tdist.all_reduce(value)
    return value / dist.world


def all_reduce_grads(module: nn.Module, dist: Dist) -> None:
    """Average gradients over processes by hand (for the discriminator, updated outside DDP)."""
    if dist.world == 1:
        return
    import torch.distributed as tdist
    for p in module.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad)
            p.grad /= dist.world
