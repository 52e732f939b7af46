"""ONE accelerate training loop for every distillation method.

The trainer owns: devices, mixed precision and process groups (accelerate), AdamW + diffusers'
``get_scheduler`` per optimiser phase, gradient accumulation and clipping, an optional EMA of the
student (diffusers ``EMAModel``), deterministic per-rank data order, atomic and exactly-resumable
checkpoints (their on-disk format lives in ``checkpoint.py``), validation
grids, CSV/TensorBoard logs, a progress bar, non-finite-loss and SIGINT/SIGTERM handling.
Multi-process runs are DDP (accelerate's ``prepare``), or under ``--sharding fsdp2`` FSDP2 applied by the trainer
itself (``sharding.py``): sharded optimisers and EMAs, sharded checkpoints, full weights gathered to rank 0 for
grids and the export (``full_weights``).
The maths lives in the method (``diffdistill.methods``), reached only through its narrow hooks.
"""

from __future__ import annotations

import contextlib
import csv
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from .checkpoint import (
    CHECKPOINT_PREFIX,
    checkpoint_folders,
    checkpoint_step,
    list_checkpoints,
    load_ema,
    load_method_state,
    load_optimizers,
    load_state_modules,
    new_run_id,
    newest_valid_checkpoint,
    read_state,
    read_trainer_state,
    require_sharding,
    resolve_resume,
    restore_rng_state,
    save_method_state,
    save_rng_state,
    save_shards,
    start_checkpoint,
    write_checkpoint,
)
from .config import RunConfig
from .data import bad_image_files, collate, require_few_bad, validation_prompts
from .errors import RunFailed, require
from .memory import peak_memory_mb
from .methods.base import DistillMethod
from .sharding import (
    full_state_dict,
    is_dtensor,
    local,
    meta_skeleton,
    min_over_ranks,
    no_gradient_sync,
    reshard,
    shard_module,
    whole_module,
)

__all__ = ["CHECKPOINT_PREFIX", "Trainer", "list_checkpoints", "resolve_resume"]


class NonFiniteError(RunFailed):
    """The loss or the weights became NaN/inf: the run stops (exit status 3), the last good checkpoint stays."""


NonFiniteLossError = NonFiniteError


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``signum`` says which signal."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.checkpoint = signum, checkpoint


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    minutes: float
    peak_memory_mb: float
    memory_kind: str
    last_logs: dict
    rank_checksums: list[str]
    stopped_by: str = "max_train_steps"
    skipped_images: list[str] = field(default_factory=list)


def segmented_lr_scheduler(name: str, optimizer, warmup_steps: int, segments: list[tuple[int, int]]):
    """A LambdaLR that runs diffusers' schedule ``name`` (warm-up included) anew on every (first, length)
    segment, e.g. linear decay to 0 within each progressive-distillation stage."""
    from diffusers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    parts = [(first, get_scheduler(name, optimizer=dummy, num_warmup_steps=min(warmup_steps, length),
                                   num_training_steps=length).lr_lambdas[0]) for first, length in sorted(segments)]

    def factor(step: int) -> float:
        first, fn = next(((f, g) for f, g in reversed(parts) if step >= f), parts[0])
        return fn(step - first)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(cfg):
    """The Accelerator for a TrainConfig: mixed precision and optional torch.compile.

    Accumulation is the trainer's own (phase-major, ``Trainer._optimizer_step``): accelerate's per-micro-batch
    counter would gate optimiser steps inside the phase loop, wrong for several or repeated phases."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.mixed_precision, dynamo_backend="inductor" if cfg.torch_compile else "no")


def rewrite_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    """Replace the CSV file ``path`` by ``header`` and ``rows`` (through a temporary file and a rename)."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


class Trainer:
    """Runs ``method`` for ``run.train.max_train_steps`` optimiser steps under accelerate."""

    def __init__(self, run: RunConfig, method: DistillMethod, teacher, out: Path, dataset, accelerator=None,
                 run_id: str | None = None):
        self.run, self.cfg, self.method, self.teacher, self.out = run, run.train, method, teacher, out
        self.run_id = run_id or new_run_id()  # every checkpoint carries it; resume and export check it
        self.dataset = dataset
        self.accelerator = accelerator or make_accelerator(self.cfg)
        self.checkpoints_dir = out / "checkpoints"
        self.samples_dir = out / "samples"
        self._stop_signal: int | None = None
        self.step = 0
        self.batches_seen = 0  # global count of micro-batches drawn, for exact data-order resume
        self.skipped_images: list[str] = bad_image_files(dataset)  # dropped at build time, then met undecodable
        self._met: list[str] = []  # undecodable images this rank met that the ranks have not agreed on yet
        self.ema = None
        self.saved_step: int | None = None  # step of this run's newest checkpoint on disk
        self.sharded = self.cfg.sharding == "fsdp2"  # FSDP2: the trainer shards the state modules (sharding.py)
        self.sharded_modules: list[torch.nn.Module] = []
        self._skeletons: dict[int, torch.nn.Module] = {}  # id(sharded module) -> its meta-device skeleton

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        acc, cfg = self.accelerator, self.cfg
        set_seed(cfg.seed)  # identical initialisation on every rank
        self.method.setup(self.teacher)
        if cfg.gradient_checkpointing:
            for m in self.method.trainable_modules().values():
                if hasattr(m, "enable_gradient_checkpointing"):
                    m.enable_gradient_checkpointing()
        if cfg.enable_xformers:
            for m in [*self.method.trainable_modules().values(), self.teacher.unet]:
                m.enable_xformers_memory_efficient_attention()
        if self.sharded:
            self._shard()
        modules = self.method.trainable_modules()
        self.optimizers, self.lr_schedulers = {}, {}
        phases = list(dict.fromkeys(self.method.phases))  # a phase may repeat (DMD2's extra critic updates)
        for phase in phases:
            params = self.method.parameters(phase)
            require(bool(params), f"method {self.method.name}: phase {phase} has no trainable parameters")
            self.optimizers[phase] = torch.optim.AdamW(
                params, lr=self.method.learning_rate(phase, cfg.learning_rate), betas=(cfg.adam_beta1, cfg.adam_beta2),
                weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
        self.method.unwrap = acc.unwrap_model
        if not self.sharded:  # FSDP2 modules are used as they are (accelerate would wrap them in DDP on CPU)
            names = list(modules)
            prepared = acc.prepare(*modules.values(), *[self.optimizers[p] for p in phases])
            prepared = prepared if isinstance(prepared, tuple) else (prepared,)
            self.method.set_trainable_modules(dict(zip(names, prepared[: len(names)])))
            self.optimizers = dict(zip(phases, prepared[len(names):]))
        segments = self.method.lr_segments()
        for phase, opt in self.optimizers.items():
            if segments is None:
                self.lr_schedulers[phase] = get_scheduler(
                    cfg.lr_scheduler, optimizer=opt, num_warmup_steps=cfg.lr_warmup_steps,
                    num_training_steps=cfg.max_train_steps)
            else:
                self.lr_schedulers[phase] = segmented_lr_scheduler(cfg.lr_scheduler, opt, cfg.lr_warmup_steps, segments)
        if cfg.student_ema_decay > 0:
            from diffusers.training_utils import EMAModel

            student = acc.unwrap_model(self.method.student)
            self.ema = EMAModel([p for p in student.parameters() if p.requires_grad], decay=cfg.student_ema_decay)
        # Different noise on every rank from here on (the data order is per-rank by construction).
        torch.manual_seed(cfg.seed * 1000 + 17 + acc.process_index)

    def _shard(self) -> None:
        """``fully_shard`` every state module (student, fake score, LCM's target) in place, keeping a meta-device
        skeleton of each to rebuild it whole from gathered weights (``full_weights``). The teacher stays whole
        on every rank (frozen, no optimiser state, run whole by every rank: see ``sharding.py``)."""
        self.sharded_modules = list(self.method.state_modules().values())
        for m in self.sharded_modules:
            self._skeletons[id(m)] = meta_skeleton(m)
            shard_module(m)

    @contextlib.contextmanager
    def full_weights(self):
        """Context manager giving the ``unwrap`` with which the main process reads whole modules: accelerate's
        ``unwrap_model``, or under FSDP a plain copy of each sharded module holding its full weights, gathered
        to rank 0 when the block opens. Collective under FSDP: every rank enters it (then only the main process
        samples or exports: a sharded forward on one rank alone would wait forever for the others)."""
        acc = self.accelerator
        if not self.sharded:
            yield acc.unwrap_model
            return
        reshard(self.sharded_modules)
        states = {id(m): full_state_dict(m) for m in self.sharded_modules}  # rank 0: CPU tensors; others: {}
        built: dict[int, torch.nn.Module] = {}

        def unwrap(module):
            key = id(module)
            if key not in states:
                return acc.unwrap_model(module)
            if key not in built:
                built[key] = whole_module(self._skeletons[key], states[key], acc.device)
            return built[key]

        yield unwrap

    # ------------------------------------------------------------------ data
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's index batches of ``epoch``: a seeded permutation, drop-last, split across ranks."""
        acc, bs = self.accelerator, self.cfg.batch_size
        n, global_bs = len(self.dataset), bs * self.accelerator.num_processes
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g)
        if n < global_bs:  # tiny datasets: repeat the permutation so one batch fills up
            perm = perm.repeat(math.ceil(global_bs / n))
        usable = (len(perm) // global_bs) * global_bs
        perm = perm[:usable].tolist()
        return [perm[i: i + global_bs][acc.process_index * bs: (acc.process_index + 1) * bs]
                for i in range(0, usable, global_bs)]

    def _epoch_loaders(self):
        """One DataLoader per epoch, without end, from micro-batch ``self.batches_seen`` on (map-style datasets)."""
        per_epoch = len(self._epoch_batches(0))
        epoch, offset = divmod(self.batches_seen, per_epoch)
        while True:
            # An own generator: a DataLoader without one draws its worker seed from the global RNG,
            # which would make a resumed run's noise differ from an uninterrupted one.
            yield DataLoader(self.dataset, batch_sampler=self._epoch_batches(epoch)[offset:], collate_fn=collate,
                             num_workers=self.run.data.dataloader_num_workers,
                             generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            epoch, offset = epoch + 1, 0

    def _stream_loader(self) -> DataLoader:
        """The one DataLoader of a streamed dataset (``data.TarShards``): this rank's shards, without end, from
        micro-batch ``self.batches_seen`` on (the stream skips what was drawn before, see its docstring)."""
        acc, bs = self.accelerator, self.cfg.batch_size
        stream = self.dataset.split(acc.process_index, acc.num_processes, self.cfg.seed, bs, self.batches_seen)
        return DataLoader(stream, batch_size=bs, collate_fn=collate, num_workers=self.run.data.dataloader_num_workers,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def _batch_stream(self):
        """Yield collated batches forever, starting at micro-batch ``self.batches_seen``."""
        streamed = isinstance(self.dataset, IterableDataset)
        loaders = iter([self._stream_loader()]) if streamed else self._epoch_loaders()
        try:
            for loader in loaders:
                for batch in loader:
                    self.batches_seen += 1
                    self._note_skipped(batch.pop("skipped", []))
                    yield batch
        except RunFailed as e:  # an unreadable image met mid-run (in a worker: its traceback text)
            message = str(e).strip().splitlines()[-1].split(f"{type(e).__name__}: ", 1)[-1]
            raise RunFailed(f"{message} (at step {self.step + 1}){self._last_good_note()}") from None

    def _note_skipped(self, skipped: list[str]) -> None:
        """Take the undecodable images a batch met (the dataset replaced them, see ``data.DecodedImages`` and
        ``data.TarShards``): at once in a single process; with several, held until ``_agree_on_skipped``."""
        new = [name for name in dict.fromkeys(skipped) if name not in self.skipped_images and name not in self._met]
        if self.accelerator.num_processes == 1:
            self._admit_skipped(new)
        else:
            self._met += new

    def _agree_on_skipped(self) -> None:
        """Several processes: every rank gathers the undecodable images all ranks met since the last call and
        applies the --max-bad-image-fraction check to the same union, at the same step (each log step), so all
        ranks go on or all stop together (a rank that stopped alone would leave the others waiting in DDP)."""
        if self.accelerator.num_processes == 1:
            return
        from accelerate.utils import gather_object

        met, self._met = gather_object([self._met]), []
        try:
            self._admit_skipped([name for names in met for name in names])
        except RunFailed as e:
            raise RunFailed(f"{e} (by step {self.step}){self._last_good_note()}") from None

    def _admit_skipped(self, names: list[str]) -> None:
        """Count the newly met undecodable images and name them on stderr (main process); RunFailed once more than
        --max-bad-image-fraction of the dataset's images (those dropped when it was built included) are bad."""
        new = [name for name in dict.fromkeys(names) if name not in self.skipped_images]
        self.skipped_images += new
        if new:  # checked first: a failing run prints its one error line alone
            dropped = len(bad_image_files(self.dataset))
            require_few_bad(len(self.skipped_images), len(self.dataset) + dropped,
                            self.run.data.max_bad_image_fraction, self.run.data.dataset, new, error=RunFailed)
        if self.accelerator.is_main_process:
            for name in new:
                print(f"warning: skipping undecodable image {name}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step> atomically: a temporary folder, flushed to disk, renamed when complete.

        The weights are checked first: a checkpoint with a NaN/inf weight is never written."""
        acc = self.accelerator
        self._check_weights()
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final, tmp = checkpoint_folders(self.checkpoints_dir, self.step)
        if acc.is_main_process:
            start_checkpoint(tmp)
        acc.wait_for_everyone()
        save_rng_state(tmp, acc.process_index)
        save_method_state(tmp, acc.process_index, self.method.extra_state())
        if self.sharded:  # every rank writes its own shards (of the sharded parameters: resharded first)
            reshard(self.sharded_modules)
            save_shards(tmp, acc.process_index, self.method.state_modules(), self.optimizers, self.ema)
        acc.wait_for_everyone()
        if acc.is_main_process:
            modules = {name: acc.unwrap_model(m) for name, m in self.method.state_modules().items()}
            write_checkpoint(tmp, final, step=self.step, batches_seen=self.batches_seen, method=self.method.name,
                             num_processes=acc.num_processes, run_id=self.run_id, modules=modules,
                             optimizers=self.optimizers, lr_schedulers=self.lr_schedulers, ema=self.ema,
                             shards=acc.num_processes if self.sharded else 0)
            self._prune()
        acc.wait_for_everyone()
        self.saved_step = self.step
        return final

    def _prune(self) -> None:
        """Keep this run's newest ``checkpoints_total_limit`` checkpoints up to the current step; a checkpoint
        another run wrote, or one beyond this step, is never counted nor removed."""
        limit = self.cfg.checkpoints_total_limit
        if limit:
            ours = [p for p in list_checkpoints(self.checkpoints_dir)
                    if checkpoint_step(p) <= self.step and (read_state(p) or {}).get("run_id") == self.run_id]
            for old in ours[:-limit]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimisers, LR schedules, EMA, RNG and data position from ``path``."""
        acc = self.accelerator
        state = read_trainer_state(path)
        require(state.get("method") == self.method.name,
                f"checkpoint {path} is from method {state.get('method')!r}, not {self.method.name!r}")
        require_sharding(path, acc.num_processes if self.sharded else 0)
        rank = acc.process_index if self.sharded else None  # a sharded checkpoint: each rank reads its own shards
        load_state_modules(path, self.method.state_modules(), acc.unwrap_model, rank=rank)
        load_optimizers(path, self.optimizers, self.lr_schedulers, rank=rank)
        if self.ema is not None:
            load_ema(path, self.ema, rank=rank)
        restore_rng_state(path, acc.process_index)
        self.method.load_extra_state(load_method_state(path, acc.process_index))
        self.step, self.batches_seen = int(state["step"]), int(state["batches_seen"])
        self.saved_step = self.step
        self.method.on_resume(self.step)

    # ------------------------------------------------------------------ validation and logs
    def validation_prompts(self) -> list[str]:
        """Ten prompts for sample grids (``data.validation_prompts``)."""
        return validation_prompts(self.run.data, self.dataset)

    @torch.no_grad()
    def save_validation_grid(self, name: str) -> Path | None:
        """Sample the current student through its export preset and save a PNG grid (main process; every rank
        enters, for the gathering of sharded weights)."""
        with self.full_weights() as unwrap:
            return self._sample_grid(name, unwrap) if self.accelerator.is_main_process else None

    def _sample_grid(self, name: str, unwrap) -> Path:
        from .export import build_pipeline
        from .images import save_grid

        modules = self.method.trainable_modules()
        for m in modules.values():
            m.eval()
        try:
            unet = self.method.export_unet(unwrap)
            pipe = build_pipeline(self.teacher, unet, self.method.export_scheduler(self.teacher.scheduler),
                                  vae=self.method.export_vae(unwrap))
            prompts = self.validation_prompts()
            gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
            with self.accelerator.autocast():
                images = pipe(prompts, num_inference_steps=self.method.sampling_steps(), generator=gens, output_type="pt",
                              **self.teacher.sample_kwargs(self.method.sampling_steps()),
                              guidance_scale=self.method.recommended_guidance_scale).images
        finally:
            for m in modules.values():
                m.train()
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        path = self.samples_dir / f"{name}.png"
        save_grid(images, path, len(prompts), pad_value=255)
        return path

    def _export_stages(self, stages: list[dict]) -> None:
        """Export finished stages to OUT/stages/<name>/ (main process), each verified by reload-and-sample."""
        if not stages or not self.accelerator.is_main_process:
            return
        from .export import export_pipeline

        for st in stages:
            info = {"method": self.method.name, "teacher": self.run.teacher, "stage": st["name"], "train_steps": self.step}
            folder = export_pipeline(self.teacher, st["unet"], st["scheduler"], self.out / "stages" / st["name"],
                                     st["steps"], self.method.recommended_guidance_scale, info,
                                     self.validation_prompts()[0])
            self.accelerator.print(f"[diffdistill] stage {st['name']} exported to {folder}")

    def _open_loggers(self):
        self._csv_file = self._csv = self._tb = None
        if not self.accelerator.is_main_process:
            return
        kinds = set(self.cfg.report_to.split(","))
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events of steps a resumed run does again
                self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1 if self.step else None)
            except ImportError:
                print("[diffdistill] tensorboard is not installed; logging to CSV only", flush=True)
                kinds.add("csv")
        if "csv" in kinds:
            self._csv_path = self.out / "logs.csv"
            self._drop_rows_after(self.step)

    def _drop_rows_after(self, step: int) -> None:
        """Remove logs.csv rows of steps after ``step`` (an interrupted run logged them; a resumed one redoes them)."""
        if not self._csv_path.is_file():
            return
        with self._csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames, list(reader)
        keep = [r for r in rows if not (r.get("step") or "").isdigit() or int(r["step"]) <= step]
        if header is not None and len(keep) < len(rows):
            rewrite_csv(self._csv_path, header, keep)

    def _log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        if getattr(self, "_csv_path", None) is not None:
            new = not self._csv_path.exists()
            if self._csv is None:
                self._csv_file = self._csv_path.open("a", newline="")
                header = list(row) if new else next(csv.reader(self._csv_path.open()))
                self._csv = csv.DictWriter(self._csv_file, fieldnames=header, extrasaction="ignore")
                if new:
                    self._csv.writeheader()
            if set(row) - set(self._csv.fieldnames):  # a key that first appears now (e.g. a later stage's)
                self._extend_csv_header(row)
            self._csv.writerow(row)
            self._csv_file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, row["step"])

    def _extend_csv_header(self, row: dict) -> None:
        """Rewrite logs.csv with the new keys of ``row`` added as columns (earlier rows leave them empty)."""
        self._csv_file.close()
        old_rows = list(csv.DictReader(self._csv_path.open(newline="")))
        header = list(self._csv.fieldnames) + [k for k in row if k not in self._csv.fieldnames]
        rewrite_csv(self._csv_path, header, old_rows)
        self._csv_file = self._csv_path.open("a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=header, extrasaction="ignore")

    def _close_loggers(self):
        if getattr(self, "_csv_file", None) is not None:
            self._csv_file.close()
        if getattr(self, "_tb", None) is not None:
            self._tb.close()

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, _frame):
        self._stop_signal = signum

    def fit(self) -> TrainResult:
        """Train to ``max_train_steps`` (resuming from one of this run's whole checkpoints if asked); returns
        timing and memory figures."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        self._setup()
        resume = resolve_resume(cfg.resume_from_checkpoint, self.checkpoints_dir, self.run_id,
                                warn=(lambda m: print(m, file=sys.stderr, flush=True)) if acc.is_main_process else None)
        if resume is not None:
            self.load_checkpoint(resume)
            acc.print(f"[diffdistill] resumed from {resume} at step {self.step}")
        elif cfg.resume_from_checkpoint == "latest":
            acc.print(f"[diffdistill] no checkpoint in {self.checkpoints_dir}; starting from step 0")
        self._open_loggers()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        stream = self._batch_stream()
        t0, steps_at_start, last_logs, stopped_by = time.time(), self.step, {}, "max_train_steps"
        log_sums: dict = {}
        bar = tqdm(total=cfg.max_train_steps, initial=self.step, disable=not acc.is_local_main_process,
                   desc=f"distill {self.method.name}", dynamic_ncols=True)
        try:
            while self.step < cfg.max_train_steps:
                self._export_stages(self.method.before_step(self.step))
                logs = self._optimizer_step([next(stream) for _ in range(cfg.gradient_accumulation_steps)])
                for sched in self.lr_schedulers.values():
                    sched.step()
                self.step += 1
                self.method.after_step(self.step)
                if self.ema is not None:
                    student = acc.unwrap_model(self.method.student)
                    self.ema.step([p for p in student.parameters() if p.requires_grad])
                for k, v in logs.items():  # running sums on the device: no host sync until the log interval
                    total, n = log_sums.get(k, (0, 0)) if torch.is_tensor(v) else (0, 0)  # numbers: the last
                    log_sums[k] = (total + v, n + 1)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_train_steps:
                    self._agree_on_skipped()
                    last_logs = self._flush_logs(log_sums, t0, steps_at_start, bar)
                if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if cfg.validation_steps and self.step % cfg.validation_steps == 0:
                    self.save_validation_grid(f"step_{self.step:06d}")
                if self._stop_signal is not None:
                    ckpt = self.save_checkpoint()
                    raise TrainingInterrupted(self._stop_signal, ckpt)
                if self._out_of_time(t0):
                    stopped_by = "max_train_minutes"
                    acc.print(f"[diffdistill] --max-train-minutes {cfg.max_train_minutes} reached at step {self.step}; "
                              "finishing the run here")
                    break
            if log_sums:  # stopped between log intervals (--max-train-minutes)
                self._agree_on_skipped()
                last_logs = self._flush_logs(log_sums, t0, steps_at_start, bar)
            self._export_stages(self.method.before_step(self.step))
            if self.saved_step != self.step:  # this run's own final checkpoint, whatever else lies in the folder
                self.save_checkpoint()
            self.save_validation_grid("final")
        finally:
            bar.close()
            self._close_loggers()
            for s, h in previous.items():
                signal.signal(s, h)
        mem, kind = peak_memory_mb(acc.device)
        return TrainResult(self.step, (time.time() - t0) / 60, mem, kind, last_logs, self.rank_checksums(), stopped_by,
                           list(self.skipped_images))

    def _optimizer_step(self, micro_batches: list[dict]) -> dict:
        """One optimiser step of every phase, in order, over the step's micro-batches; returns the logs (device
        tensors, averaged over the micro-batches, prefixed by phase when there are several optimisers).

        Phase-major: each phase (a repeated one included, e.g. DMD's extra fake-score updates) accumulates the
        gradient of all k micro-batches (loss / k each, gradient sync only on the last) and then steps its own
        optimiser once, so k micro-batches of size b give the update of one batch of k*b. Finiteness is checked
        once per step (one host sync) after the updates; on failure the run stops without saving."""
        acc, cfg, method = self.accelerator, self.cfg, self.method
        k = len(micro_batches)
        modules = list(method.trainable_modules().values())
        logs, finite = {}, []
        for phase in method.phases:
            opt = self.optimizers[phase]
            prefix = "" if len(self.optimizers) == 1 else f"{phase}/"
            for i, batch in enumerate(micro_batches):
                with contextlib.ExitStack() as stack:
                    if i < k - 1 and self.sharded:  # accumulate locally; the last backward reduce-scatters
                        stack.enter_context(no_gradient_sync(modules))
                    elif i < k - 1:  # accumulate locally; the last micro-batch's backward all-reduces
                        for m in modules:
                            stack.enter_context(acc.no_sync(m))
                    with acc.autocast():
                        loss, phase_logs = method.loss(phase, batch, self.step)
                    finite.append(torch.isfinite(loss.detach()).all())
                    acc.backward(loss / k if k > 1 else loss)
                for key, v in phase_logs.items():  # the mean over micro-batches (a repeated phase: its last)
                    v = v / k if k > 1 else v
                    logs[prefix + key] = logs.get(prefix + key, 0) + v if i else v
            if cfg.max_grad_norm > 0 and self.sharded:  # the norm of the DTensor gradients: over all shards
                torch.nn.utils.clip_grad_norm_(method.parameters(phase), cfg.max_grad_norm)
            elif cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(method.parameters(phase), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            reshard(self.sharded_modules)  # e.g. LCM's target after its no-grad forward, before its EMA update
        finite = torch.stack(finite).all()
        if self.sharded:  # every rank stops together (one alone would leave the others waiting in a collective)
            finite = min_over_ranks(finite.float()) > 0
        if not bool(finite):  # the one host synchronisation of the step
            bad = sorted(key for key, v in logs.items() if not torch.isfinite(torch.as_tensor(v)).all())
            raise NonFiniteError(f"non-finite loss at step {self.step + 1} (term {', '.join(bad) or 'loss'}); this "
                                 f"step's update was not saved{self._last_good_note()}")
        return logs

    def _flush_logs(self, sums: dict, t0: float, steps_at_start: int, bar) -> dict:
        """Log the means of ``sums`` (key -> (running sum, steps seen)) since the last log, empty it, return the
        row. All device tensors travel to the host in one transfer: the only sync of the log interval."""
        keys = [k for k, (v, _) in sums.items() if torch.is_tensor(v)]
        means = {k: float(v) / n for k, (v, n) in sums.items() if not torch.is_tensor(v)}
        if keys:
            values = torch.stack([sums[k][0].detach().float().reshape(()) for k in keys]).cpu().tolist()
            means.update({k: v / sums[k][1] for k, v in zip(keys, values)})
        sums.clear()
        rate = (self.step - steps_at_start) / max(time.time() - t0, 1e-9)
        row = {"step": self.step, "lr": self.lr_schedulers[self.method.phases[0]].get_last_lr()[0],
               **means, "it_per_s": rate, "elapsed_s": time.time() - t0}
        bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if "loss" in k})
        self._log(row)
        return row

    def _out_of_time(self, t0: float) -> bool:
        """Whether --max-train-minutes has passed; the main process decides for every rank."""
        if not self.cfg.max_train_minutes:
            return False
        late = time.time() - t0 >= 60 * self.cfg.max_train_minutes
        if self.accelerator.num_processes == 1:
            return late  # no device tensor and no sync on the hot path of a single process
        from accelerate.utils import broadcast

        return bool(broadcast(torch.tensor([float(late)], device=self.accelerator.device), from_process=0).item())

    def rank_checksums(self) -> list[str]:
        """SHA-256 of the student's state dict on every rank, in rank order: equal on all ranks exactly when DDP
        kept every weight bit-identical (a sum of weights misses differences that cancel or sit below its
        rounding). Hashes each tensor's name and raw bytes in sorted key order, so the ``model_student.safetensors``
        of a full (non-LoRA) checkpoint of the same step gives the same digest. Under FSDP each rank hashes the
        full weights (gathered tensor by tensor), so the digests agree exactly when the gathering does."""
        import hashlib

        from accelerate.utils import gather_object

        state = self.accelerator.unwrap_model(self.method.student).state_dict()
        digest = hashlib.sha256()
        for key in sorted(state):
            value = state[key].full_tensor() if is_dtensor(state[key]) else state[key]  # collective, same order
            digest.update(key.encode() + b"\0")
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return gather_object([digest.hexdigest()])

    def _last_good_note(self) -> str:
        """'; last good checkpoint: ...' (this run's newest whole one, to resume from), or that there is none."""
        last = newest_valid_checkpoint(self.checkpoints_dir, self.run_id) if self.saved_step is not None else None
        return f"; last good checkpoint: {last}" if last else "; no checkpoint was written yet"

    def _check_weights(self) -> None:
        """Raise NonFiniteError when a trained weight (or the student EMA) holds a NaN/inf: one host sync,
        paid once per checkpoint. A diverged update shows up here even when no loss saw it yet."""
        groups = {name: [local(p) for p in self.accelerator.unwrap_model(m).parameters() if p.requires_grad]
                  for name, m in self.method.state_modules().items()}
        if self.ema is not None:
            groups["student EMA"] = [local(p) for p in self.ema.shadow_params]
        groups = {k: v for k, v in groups.items() if v}
        finite = torch.stack([torch.stack([torch.isfinite(p).all() for p in ps]).all() for ps in groups.values()])
        if self.sharded:  # each rank sees its own shards: every rank must reach the same verdict
            finite = min_over_ranks(finite.float()) > 0
        bad = [name for name, ok in zip(groups, finite.tolist()) if not ok]
        if bad:
            raise NonFiniteError(f"non-finite weights in {bad[0]} after step {self.step} (the optimiser step "
                                 f"diverged: try a lower --learning-rate); not saved{self._last_good_note()}")

    def export_ema_weights(self):
        """Context manager: the student holds its EMA weights inside the block (no-op without EMA)."""
        import contextlib

        if self.ema is None:
            return contextlib.nullcontext()
        student = self.accelerator.unwrap_model(self.method.student)
        params = [p for p in student.parameters() if p.requires_grad]

        @contextlib.contextmanager
        def swap():
            self.ema.store(params)
            self.ema.copy_to(params)
            try:
                yield
            finally:
                self.ema.restore(params)

        return swap()

