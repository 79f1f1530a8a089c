"""The one training loop: plain, torchrun and Ray launchers all call :func:`fit`.

It takes loaders that yield :class:`~scvi_scale.data.Batch` minibatches, so nothing here assumes the
data is in memory. Per epoch it logs scvi-tools' metrics (``train/loss`` with the current KL weight, and the
unweighted ``elbo``, ``reconstruction_loss``, ``kl_local`` per cell), validates, checkpoints atomically
and can stop early on the validation ELBO. A checkpoint holds model, optimizer, loader position, RNG
state and the resolved config; resuming from one replays exactly the batches that were left.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from scvi_scale.config import TrainConfig
from scvi_scale.data.batch import Batch
from scvi_scale.dist import DistContext, wrap_model
from scvi_scale.store.errors import InputError
from scvi_scale.train.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, atomic_save, safe_load
from scvi_scale.train.metrics import MetricsLog
from scvi_scale.train.noise import cell_normal
from scvi_scale.train.optim import kl_weight, make_optimizer

log = logging.getLogger(__name__)


class Loader(Protocol):
    """What the loop needs from a loader: epochs of minibatches and a resumable position."""

    def __iter__(self) -> Iterable[Batch]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self, steps_done: int) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TrainingInterrupted(RuntimeError):
    """Raised after a Ctrl-C (or a notebook's interrupt) stopped training and a resumable checkpoint was written.

    ``checkpoint`` is the file written (None when training had no run directory), ``epoch`` and ``step`` where
    training stopped (``step`` minibatches of ``steps_per_epoch`` done in that epoch), and ``resume_hint`` the
    calls that continue it; the message says all of that.
    """

    def __init__(
        self,
        checkpoint: Path | None,
        epoch: int | None = None,
        step: int | None = None,
        steps_per_epoch: int | None = None,
        resume_hint: str | None = None,
    ) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.epoch, self.step, self.steps_per_epoch = epoch, step, steps_per_epoch
        self.run_dir = self.checkpoint.parent.parent if self.checkpoint is not None else None
        if resume_hint is None and self.checkpoint is not None:
            resume_hint = f"--resume {self.run_dir} (the checkpoint {self.checkpoint})"
        self.resume_hint = resume_hint
        where = ""
        if epoch is not None:
            where = f" after {epoch} full epoch{'' if epoch == 1 else 's'}"
            where += f" and {step} of the next epoch's {steps_per_epoch} steps" if step else ""
        if self.checkpoint is None:
            tail = "; nothing was saved (train with a run directory, `out`, to keep a resumable checkpoint)"
        else:
            tail = f"; checkpoint saved to {self.checkpoint}.\nTo continue, resume with {resume_hint}"
        super().__init__(f"training interrupted{where}{tail}")

    def with_hint(self, resume_hint: str) -> TrainingInterrupted:
        """The same interruption with another resume hint (the API knows the data and the run directory)."""
        return TrainingInterrupted(self.checkpoint, self.epoch, self.step, self.steps_per_epoch, resume_hint)


class _DeferredInterrupt:
    """Turns the first SIGINT (Ctrl-C, a notebook's interrupt button) into a flag the loop checks between steps.

    Why: a KeyboardInterrupt raised at an arbitrary bytecode can land between ``optimizer.step()`` and the step
    counter, so the checkpoint would replay a minibatch the weights already saw. With the flag, the loop stops at
    the next step boundary with consistent state. A second SIGINT raises KeyboardInterrupt at once (a stuck read),
    and the loop still checkpoints its position. Only the main thread of a single process can own the handler;
    elsewhere (threads, data-parallel ranks, which must stop together) KeyboardInterrupt behaves as before.
    """

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._previous: Any = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.debug("interrupt requested; stopping after this step")

    def __enter__(self) -> _DeferredInterrupt:
        if self._enabled:
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
            except ValueError:  # not the main thread of the main interpreter after all
                self._enabled = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:  # None: the previous handler was not installed from Python; the default stands in
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


@dataclass
class ElboSums:
    """Running sums over cells of one epoch's loss terms (tensors until read, so GPUs need not sync)."""

    loss: Any = 0.0
    reconstruction: Any = 0.0
    kl_local: Any = 0.0
    n_obs: int = 0

    def add(self, terms, n: int) -> None:
        self.loss = self.loss + terms.loss.detach() * n
        self.reconstruction = self.reconstruction + terms.reconstruction_n.detach().sum()
        self.kl_local = self.kl_local + (terms.kl_z_n + terms.kl_l_n).detach().sum()
        self.n_obs += n

    def means(self, prefix: str) -> dict[str, float]:
        n = max(self.n_obs, 1)
        rec, kl = float(self.reconstruction) / n, float(self.kl_local) / n
        return {
            f"{prefix}/loss": float(self.loss) / n,
            f"{prefix}/elbo": rec + kl,  # negative ELBO per cell (kl_global is 0 for scVI)
            f"{prefix}/reconstruction_loss": rec,
            f"{prefix}/kl_local": kl,
        }

    def reduced(self, ctx: DistContext) -> ElboSums:
        """The sums over every rank (a collective: all ranks call it at the same point)."""
        if not ctx.distributed:
            return self
        loss, rec, kl, n = ctx.sum([float(self.loss), float(self.reconstruction), float(self.kl_local), self.n_obs])
        return ElboSums(float(loss), float(rec), float(kl), int(n))

    def state(self) -> dict[str, float]:
        return {
            "loss": float(self.loss),
            "reconstruction": float(self.reconstruction),
            "kl_local": float(self.kl_local),
            "n_obs": self.n_obs,
        }


@dataclass
class FitResult:
    """What :func:`fit` did: epochs and steps run, the metric rows, and why it stopped."""

    epochs: int
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    checkpoint: Path | None = None


@torch.no_grad()
def _eval_sums(model: nn.Module, loader: Iterable[Batch], kl_weight: float, device: str | torch.device) -> ElboSums:
    was_training = model.training
    model.eval()
    sums = ElboSums()
    for batch in loader:
        batch = batch.to(device)
        sums.add(model(batch.x_ng, batch.batch_n, kl_weight, batch.nonzero), batch.n_obs)
    model.train(was_training)
    return sums


def evaluate_elbo(
    model: nn.Module,
    loader: Iterable[Batch],
    kl_weight: float = 1.0,
    device: str | torch.device = "cpu",
    prefix: str = "validation",
    dist: DistContext | None = None,
) -> dict[str, float]:
    """Mean per-cell loss terms over a loader, model in eval mode (BN running stats, no dropout).

    With a distributed ``dist``, each rank evaluates its share of the cells and the sums are added over ranks.
    """
    sums = _eval_sums(model, loader, kl_weight, device).reduced(dist or DistContext.single())
    out = sums.means(prefix)
    out[f"{prefix}/n_obs"] = sums.n_obs
    return out


def fit(
    model: nn.Module,
    train_loader: Loader,
    val_loader: Loader | None,
    cfg: TrainConfig,
    max_epochs: int,
    *,
    run_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    extra_state: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    dist: DistContext | None = None,
) -> FitResult:
    """Train ``model`` for ``max_epochs`` epochs (or until early stopping).

    Parameters
    ----------
    model
        The VAE (or a DDP wrapper around it); called as ``model(x_ng, batch_n, kl_weight) -> LossTerms``.
    train_loader, val_loader
        Loaders of :class:`Batch`; ``val_loader`` may be None (no validation, no early stopping).
    cfg
        Optimiser, warm-up, checkpoint and early-stopping settings.
    max_epochs
        Epoch count (resolved by the caller, e.g. with scvi-tools' heuristic).
    run_dir
        Where ``metrics.csv`` and ``checkpoints/last.pt`` go; None keeps everything in memory.
    resume_from
        A checkpoint written by this loop; training continues exactly where it stopped.
    extra_state
        Plain data saved in every checkpoint (resolved config, gene names, batch categories).
    on_epoch_end
        Called with each epoch's metric row (on every rank; the row holds sums over all ranks).
    dist
        This process's place in a data-parallel job (default: one process). The model is wrapped in DDP here
        and stays single-device; each rank's loaders serve its own share of the cells. Metrics, progress and
        checkpoints come from rank 0; loss sums and validation are added over ranks, stage times are the
        slowest rank's.
    """
    ctx = dist or DistContext.single(device)
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_dir / "checkpoints" / "last.pt" if run_dir is not None and ctx.is_main else None
    model.to(device)
    core = model  # what checkpoints hold: the model itself, never the DDP wrapper
    optimizer = make_optimizer(core, cfg.lr, cfg.eps, cfg.weight_decay)
    metrics = MetricsLog(run_dir if ctx.is_main else None)
    start_epoch, global_step, start_sums, resume_steps = 0, 0, None, 0
    best, bad_epochs = math.inf, 0
    if resume_from is not None:
        state = safe_load(resume_from, CHECKPOINT_FORMAT)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        try:
            train_loader.load_state_dict(state["loader"])
        except ValueError as err:
            raise InputError(f"cannot resume from {resume_from}: {err}") from None
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        if ctx.distributed:  # each rank its own dropout stream, fixed by (seed, rank, step)
            torch.manual_seed(hash((cfg.seed, ctx.rank, global_step)) % 2**63)
        else:
            torch.set_rng_state(state["torch_rng"])
        start_sums = state.get("epoch_sums") if ctx.is_main else None  # global sums: counted once, on rank 0
        resume_steps = int(state["loader"].get("step", 0))
        best, bad_epochs = float(state.get("best", math.inf)), int(state.get("bad_epochs", 0))
        metrics.truncate(start_epoch)
        log.info("resuming at epoch %d, step %d of the epoch", start_epoch, resume_steps)
    else:
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)  # rank 0 (and one process) keeps the plain seed
    train_model = wrap_model(core, ctx, cfg.sync_batchnorm)
    keyed = cfg.keyed_noise == "on" or (cfg.keyed_noise == "auto" and ctx.distributed)

    def checkpoint(epoch: int, steps_done: int, sums: ElboSums | None, collective: bool = True) -> Path | None:
        """Rank 0 writes; with ``collective`` every rank must call it (the epoch sums are added over ranks)."""
        if sums is not None and collective:
            sums = sums.reduced(ctx)
        elif sums is not None and ctx.distributed:
            sums = None  # rank 0's part alone would be wrong for the epoch: the resumed epoch starts its sums anew
        if ckpt_path is None:
            return None
        return atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "version": FORMAT_VERSION,
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "loader": train_loader.state_dict(steps_done),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "global_step": global_step,
                "best": best,
                "bad_epochs": bad_epochs,
                "epoch_sums": sums.state() if sums is not None else None,
                **(extra_state or {}),
            },
            ckpt_path,
        )

    steps_per_epoch = len(train_loader)
    timings = getattr(train_loader, "timings", None)  # per-stage seconds, from loaders that keep them
    if hasattr(train_loader, "plan_epochs"):  # loaders that read into the next epoch stop at the last one
        train_loader.plan_epochs(max_epochs)

    def loader_timings() -> dict[str, float] | None:
        return dict(timings()) if timings is not None else None

    bar = _progress(
        cfg.progress and ctx.is_main, total=max_epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch
    )
    result = FitResult(epochs=start_epoch, global_step=global_step, history=metrics.rows)
    epoch = start_epoch
    sums = ElboSums()
    steps_done = 0
    interrupt = _DeferredInterrupt(not ctx.distributed).__enter__()
    try:
        for epoch in range(start_epoch, max_epochs):
            train_loader.set_epoch(epoch)
            train_model.train()
            sums = ElboSums()
            steps_done = 0
            if start_sums is not None and epoch == start_epoch:
                sums = ElboSums(**start_sums)
                steps_done = resume_steps
                bar.update(steps_done)
            warmup = (cfg.n_epochs_kl_warmup, cfg.n_steps_kl_warmup, cfg.min_kl_weight, cfg.max_kl_weight)
            w = kl_weight(epoch, global_step, *warmup)  # also defined when a resumed epoch has no batches left
            t_epoch = time.perf_counter()
            data_s = step_s = to_s = 0.0
            cells = 0
            stages_before = loader_timings()
            t0 = time.perf_counter()
            for batch in train_loader:
                t_to = time.perf_counter()
                batch = batch.to(device, non_blocking=True)
                t1 = time.perf_counter()
                to_s += t1 - t_to
                w = kl_weight(epoch, global_step, *warmup)
                eps = _keyed_noise(cfg.seed, epoch, batch, core) if keyed else {}
                with _autocast(cfg.precision, batch.x_ng.device):
                    terms = train_model(batch.x_ng, batch.batch_n, w, batch.nonzero, **eps)
                optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                optimizer.step()
                global_step += 1
                steps_done += 1
                sums.add(terms, batch.n_obs)
                cells += batch.n_obs
                t2 = time.perf_counter()
                data_s += t1 - t0
                step_s += t2 - t1
                t0 = t2
                bar.update(1)
                if bar.should_refresh():
                    bar.set_postfix(
                        epoch=epoch,
                        elbo=f"{sums.means('t')['t/elbo']:.2f}",
                        cells_s=f"{cells / max(time.perf_counter() - t_epoch, 1e-9):,.0f}",
                    )
                if cfg.checkpoint_every_n_steps and global_step % cfg.checkpoint_every_n_steps == 0:
                    checkpoint(epoch, steps_done, sums)
                if interrupt.requested:  # Ctrl-C: stop here, at a step boundary (one process only)
                    path = checkpoint(epoch, steps_done, sums)
                    raise TrainingInterrupted(path, epoch, steps_done, steps_per_epoch)
            epoch_s = time.perf_counter() - t_epoch
            row: dict[str, Any] = {"epoch": epoch, "step": global_step, "kl_weight": w}
            row.update(sums.reduced(ctx).means("train"))
            if val_loader is not None and len(val_loader) and (epoch + 1) % cfg.check_val_every_n_epoch == 0:
                row.update(evaluate_elbo(core, val_loader, w, device, dist=ctx))
                row.pop("validation/n_obs", None)
                if cfg.early_stopping:
                    current = row["validation/elbo"]
                    if current < best - cfg.early_stopping_min_delta:
                        best, bad_epochs = current, 0
                    else:
                        bad_epochs += 1
            row.update(
                {
                    "perf/cells_per_s": cells / max(epoch_s, 1e-9),
                    "perf/epoch_s": epoch_s,
                    "perf/step_s": step_s,
                    "perf/data_s": data_s,
                }
            )
            if stages_before is not None:
                row.update(_stage_times(stages_before, loader_timings(), data_s, to_s))
            if ctx.distributed:  # the slowest rank's stage times; cells/s of the whole job
                perf = sorted(k for k in row if k.startswith("perf/") and k != "perf/cells_per_s")
                row.update(zip(perf, ctx.max([row[k] for k in perf]).tolist(), strict=True))
                row["perf/cells_per_s"] = float(ctx.sum([cells])[0]) / max(row["perf/epoch_s"], 1e-9)
                row["world_size"] = ctx.world_size
            metrics.log(row)
            result.epochs = epoch + 1
            result.global_step = global_step
            stop = cfg.early_stopping and bad_epochs >= cfg.early_stopping_patience
            last = epoch + 1 == max_epochs or stop
            if last or (epoch + 1) % cfg.checkpoint_every_n_epochs == 0:
                train_loader.set_epoch(epoch + 1)
                result.checkpoint = checkpoint(epoch + 1, 0, None)
            if on_epoch_end is not None:  # after the epoch's checkpoint, so a hook can publish it
                on_epoch_end(row)
            if interrupt.requested and not (last or stop):  # Ctrl-C during validation or the epoch's bookkeeping
                train_loader.set_epoch(epoch + 1)
                raise TrainingInterrupted(checkpoint(epoch + 1, 0, None), epoch + 1, 0, steps_per_epoch)
            if stop:
                log.info(
                    "early stopping at epoch %d: validation ELBO has not improved for %d checks", epoch, bad_epochs
                )
                result.stopped_early = True
                break
    except KeyboardInterrupt:
        path = checkpoint(epoch, steps_done, sums, collective=False)
        raise TrainingInterrupted(path, epoch, steps_done, steps_per_epoch) from None
    finally:
        try:
            if hasattr(train_loader, "close"):  # a pass started ahead (early stopping, an error) is not needed now
                train_loader.close()
        finally:
            interrupt.__exit__()
            bar.close()
            metrics.close()
    return result


def _keyed_noise(seed: int, epoch: int, batch: Batch, model: nn.Module) -> dict[str, torch.Tensor]:
    """Reparameterisation noise keyed by (seed, epoch, cell): the same draw wherever the cell lands."""
    rows = torch.as_tensor(batch.rows_n, dtype=torch.int64)
    dtype, device = batch.x_ng.dtype, batch.x_ng.device
    eps = {"eps_z": cell_normal(seed, epoch, rows, model.config.n_latent, dtype).to(device)}
    if not model.config.use_observed_lib_size:
        eps["eps_l"] = cell_normal(seed + 7919, epoch, rows, 1, dtype).to(device)
    return eps


def _autocast(precision: str, device: torch.device) -> Any:
    """bf16 autocast on CUDA (``"auto"`` or ``"bf16"``); float32 everywhere else and with ``"32"``."""
    use = device.type == "cuda" and precision in ("auto", "bf16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


def _stage_times(before: dict[str, float], after: dict[str, float], data_s: float, to_s: float) -> dict[str, float]:
    """One epoch's loader stages: read/decode/assemble (background threads, summed over them), host-to-device
    (the loader's device staging plus ``Batch.to``) and idle (the loop waiting for the next minibatch)."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("read_s", "decode_s", "assemble_s", "h2d_s")}
    return {
        "perf/read_s": delta["read_s"],
        "perf/decode_s": delta["decode_s"],
        "perf/assemble_s": delta["assemble_s"],
        "perf/h2d_s": delta["h2d_s"] + to_s,
        "perf/idle_s": max(data_s - to_s - delta["h2d_s"], 0.0),
    }


class _progress:
    """A tqdm bar (terminal or notebook) that tells the loop when to refresh its postfix."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5
        )
        self._last = 0.0

    def update(self, n: int) -> None:
        self._bar.update(n)

    def should_refresh(self) -> bool:
        if self._bar.disable:
            return False
        now = time.monotonic()
        if now - self._last > 1.0:
            self._last = now
            return True
        return False

    def set_postfix(self, **kw: Any) -> None:
        self._bar.set_postfix(**kw, refresh=False)

    def close(self) -> None:
        self._bar.close()
