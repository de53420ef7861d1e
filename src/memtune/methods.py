"""Ways to learn new data, behind one interface: sparse memory finetuning (SMF) and the
baselines, full finetuning and LoRA. The training loop (`memtune.train`) is the same for all.

A method prepares the model (what is trainable), applies one optimizer step after the step's
gradients are in, and saves what it learned in its own format.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from memtune import distributed
from memtune.batches import COUNT_POSITIONS
from memtune.errors import MemtuneError, is_int, is_number
from memtune.ledger import union as _union
from memtune.memory import check_query_noise, check_slot_dropout
from memtune.rankers import NEEDS_BACKGROUND, get_ranker, select_top
from memtune.retrofit import get_memory_bank, require_memory_bank
from memtune.sharding import local_optimizer_state, whole_optimizer_state
from memtune.sparse_optim import OPTIMIZERS, make_sparse_optimizer
from memtune.stats import Background, StepUsage

log = logging.getLogger(__name__)

METHODS = ("smf", "full", "lora")
DEFAULT_LR = {("smf", "adam"): 2.0, ("smf", "sgd"): 1e7, ("full", "adamw"): 2e-5, ("lora", "adamw"): 5e-4}


class Method(Protocol):
    """`prepare` once, then `step` per optimizer step; `model` is what `prepare` returned, so
    training can resume on it (another chunk of a stream) with the optimizer state kept.

    Optional: `loss(model, batch) -> dict[str, Tensor]`, the method's own objective on one
    micro-batch (scalars, "loss" the one backpropagated; the default is the next-token loss),
    and `train_mode = False` to train in eval mode (healing: `memtune.heal.Heal`)."""

    name: str
    model: nn.Module | None

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (a schedule sets it before each step)."""

    def step(self, usage: StepUsage | None) -> dict: ...

    def begin(self) -> None:
        """Called as `train` starts on data (each chunk of a stream)."""

    def save(self, model: nn.Module, tokenizer, path: Path) -> None: ...


@dataclass(frozen=True)
class SMFConfig:
    """Sparse memory finetuning, whole: how each step ranks the slots its counted positions read
    and updates the top-T value rows (Lin et al., Sparse Memory Finetuning, eq. 1-2 for tfidf),
    and which rows stay frozen. `memtune.train.LearnConfig.smf()` makes one from learn options.

    - ranker: a name in `memtune.rankers.RANKERS` (tfidf and kl need background statistics);
    - top_t: value rows updated per memory layer and step;
    - optimizer, lr: `memtune.sparse_optim` (adam: per-row state; sgd), learning rate;
    - count_positions: reads that count: at positions predicting loss tokens ("loss"), or "all";
    - freeze_learned: rows updated for earlier data (earlier `train` calls, earlier learn calls in
      the memory's ledger) are never updated again;
    - protect_learned: once data is learned, every row its text reads is frozen for later data
      (the caller measures the reads: `SparseMemoryFinetuning.keep_reads`);
    - seed: the random ranker's generator;
    - write_knn: slots each memory head reads per token while training (so counted, ranked and
      updated), at least the memory's knn; reading (eval mode) stays at knn. A wider write than
      read: a rephrased question whose query lands near the trained one's may find the fact
      (issue 17). None: knn.
    - query_noise: std of Gaussian noise added to each normalised query element while training
      (units of the query's RMS; reading in eval mode stays exact). Each step then reads, ranks and
      writes the slots of a query jittered about as far as a rephrasing moves it (σ 0.2-0.3 share
      as many reads with the exact query as a paraphrase does on SmolLM2-135M, BENCHMARKS.md), so
      the neighbours a rephrased question reads learn the fact too (issue 17). 0: exact. Measured
      at σ 0.3 on 40 country facts: no gain on held-out paraphrases, twice the steps.
    - slot_dropout: the probability that each slot a training read takes is left out of it, the
      others not rescaled, so the fact's answer must come from any part of its slots — as when
      a rephrased question reads only part of them (a third to a half on SmolLM2-135M,
      BENCHMARKS.md; issue 17). Reading in eval mode takes every slot. 0: none. Measured at
      p 0.5 on 40 facts: held-out paraphrases 43.8 % on countries (41.2 % without), 7.5 % on
      elements (6.2 %), every known fact kept, a third more steps.

    Raises MemtuneError for a value outside these."""

    ranker: str = "tfidf"
    top_t: int = 1000
    optimizer: str = "adam"
    lr: float = DEFAULT_LR[("smf", "adam")]
    count_positions: str = "loss"
    freeze_learned: bool = False
    protect_learned: bool = False
    seed: int = 0
    write_knn: int | None = None
    query_noise: float = 0.0
    slot_dropout: float = 0.0

    def __post_init__(self) -> None:
        get_ranker(self.ranker)
        check_query_noise(self.query_noise)
        check_slot_dropout(self.slot_dropout)
        if self.write_knn is not None and (not is_int(self.write_knn) or self.write_knn <= 0):
            raise MemtuneError(f"write_knn={self.write_knn!r} is invalid: expected a positive integer")
        if self.optimizer not in OPTIMIZERS:
            raise MemtuneError(f"optimizer={self.optimizer!r} is invalid: expected one of {', '.join(OPTIMIZERS)}")
        if not is_int(self.top_t) or self.top_t <= 0:
            raise MemtuneError(f"top_t={self.top_t!r} is invalid: expected a positive integer")
        if not is_number(self.lr) or not 0 < self.lr < float("inf"):
            raise MemtuneError(f"lr={self.lr} is invalid: expected a positive number")
        if self.count_positions not in COUNT_POSITIONS:
            raise MemtuneError(f"count_positions={self.count_positions!r} is invalid: expected one of "
                               f"{', '.join(COUNT_POSITIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def _count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class SparseMemoryFinetuning:
    """Per step and memory layer: rank the slots read by the step's counted positions, keep
    the top-T, and update only those value rows (the union over layers sharing a table).

    Rows may be frozen, never selected: those that `protect` statistics (slot reads of what the
    model must keep, e.g. its own answers to questions it knows) show read, those added by
    `protect_reads` / `keep_reads` between `train` calls (e.g. what each chunk of a stream reads
    once learned), and with `freeze_learned` those updated while learning earlier data (earlier
    `train` calls, and earlier learn calls recorded in the memory's ledger), so later data
    cannot overwrite what they hold."""

    name = "smf"
    model: nn.Module | None = None

    def __init__(self, config: SMFConfig | None = None, background: Background | None = None,
                 protect: Background | None = None):
        self.config = config = config or SMFConfig()
        self.ranker = get_ranker(config.ranker)
        if config.ranker in NEEDS_BACKGROUND and background is None:
            raise MemtuneError(f"ranker={config.ranker!r} needs background statistics: pass --background DIR "
                               "(from `memtune background`) or use --ranker count|random")
        self.optimizer = make_sparse_optimizer(config.optimizer, config.lr)
        self.background = background
        self.generator = torch.Generator().manual_seed(config.seed)
        self.freeze_learned = config.freeze_learned
        self.protect = protect
        self.touched: dict[int, Tensor] = {}  # table -> rows ever updated (sorted)
        self.protected: dict[int, Tensor] = {}  # table -> rows the protect statistics read (sorted)
        self.kept: dict[int, Tensor] = {}  # table -> rows frozen by `keep_reads` (for the ledger)
        self.earlier: dict[int, Tensor] = {}  # table -> rows earlier learn calls froze (the ledger's)
        self.frozen: dict[int, Tensor] = {}  # table -> rows that may not be updated (sorted)
        self.originals: dict[int, list[tuple[Tensor, Tensor]]] | None = None  # table -> (rows, values before)
        self.relearn = False  # the next train call learns the same data again (after unwrite)

    def prepare(self, model: nn.Module) -> nn.Module:
        bank = require_memory_bank(model)
        for stats in (self.background, self.protect):
            if stats is not None:
                stats.check(bank)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("memory.values."))
        bank.set_record(True)
        bank.set_write_knn(self.config.write_knn)
        bank.set_query_noise(self.config.query_noise)
        bank.set_slot_dropout(self.config.slot_dropout)
        self.bank = bank
        self.table_of = {k: bank.table_index(int(k)) for k in bank.layers}
        if self.protect is not None:
            self.protect_reads(self.protect)
        ledger = bank.ledger  # what earlier learn calls on this memory froze
        self.earlier = dict(ledger.frozen) if self.freeze_learned else {}
        if not self.freeze_learned and ledger.optimizer:
            self.optimizer.load_state_tensors([v.weight for v in bank.values],
                                              local_optimizer_state(ledger.optimizer, bank.values))  # sharded: our columns
        self.trainable = _count_trainable(model)
        self.model = model
        return model

    def protect_reads(self, stats: Background) -> None:
        """Freeze, from the next `train` call on, every row that `stats` show read."""
        for k, t in self.table_of.items():
            self.protected[t] = _union(self.protected.get(t), stats.df[k].nonzero().flatten())

    def keep_reads(self, stats: Background) -> None:
        """`protect_reads`, and record the rows in the checkpoint's ledger as frozen for later
        learn calls: what learned data reads (e.g. a chunk of a stream, once learned) stays."""
        for k, t in self.table_of.items():
            self.kept[t] = _union(self.kept.get(t), stats.df[k].nonzero().flatten())

    def keep_learned(self, model: nn.Module, examples: list, pad_id: int, batch_size: int = 8) -> None:
        """`keep_reads` of what `examples` (learned data) read now, at every position of their
        text: with `protect_learned`, after each chunk of a stream and each learn call."""
        from memtune.stats import background_stats

        if examples:
            self.keep_reads(background_stats(model, examples, pad_id, len(examples), batch_size, "all",
                                             progress=False))

    def record_call(self, entry: dict, freeze_updated: bool = True) -> dict:
        """Add this call to the memory's ledger (`memtune.ledger`): the rows it updated, and as
        frozen for later calls the `keep_reads` rows and (`freeze_updated`) the rows it updated.
        A caller that kept what its learned data reads passes `freeze_updated=False`, so rows
        updated only for data it did not learn stay free for a later call. The sparse optimizer
        state is kept only when learned rows were not frozen (`freeze_learned=False`): only then
        can a later call move them again. Returns the journal entry."""
        updated = self.touched if freeze_updated else {}
        frozen = {t: _union(updated.get(t), self.kept.get(t)) for t in {*updated, *self.kept}}
        state = {} if self.freeze_learned else whole_optimizer_state(  # sharded tables: gathered, as one process's
            self.optimizer.state_tensors([v.weight for v in self.bank.values]), self.bank.values)
        entry = {**entry, "rows_kept": sum(int(r.numel()) for r in self.kept.values()),
                 "rows_protected": sum(int(r.numel()) for r in self.protected.values())}
        return self.bank.ledger.record(entry, self.touched, frozen, state)

    def remember_originals(self) -> None:
        """From now on, keep each row's value from before its first update, so `unwrite` can give
        it back (rows x value dim floats per table: off unless asked)."""
        if self.originals is None:
            self.originals = {}

    def unwrite(self, stats: Background) -> int:
        """Un-write the rows this method updated that `stats` show read (any layer sharing the
        table): each gets back its value from before its first update (`remember_originals` must
        have been called before training), loses its optimizer state and is protected from the
        next `train` call on, so what needs it is learned elsewhere. That call learns the same
        data again: the rows this method updated and kept stay free to it, whatever
        `freeze_learned`. Returns the number of rows un-written. RuntimeError if an un-written
        row has no value from before (`remember_originals` came after training began)."""
        if self.originals is None:
            raise RuntimeError("unwrite needs the values from before training: call remember_originals() first")
        self.relearn = True
        n = 0
        for t, table in enumerate(self.bank.values):
            touched = self.touched.get(t)
            if touched is None:
                continue
            read = torch.cat([stats.df[k].nonzero().flatten() for k, owner in self.table_of.items() if owner == t])
            rows = torch.unique(read[torch.isin(read, touched)])
            if rows.numel() == 0:
                continue
            with torch.no_grad():
                table.weight[rows.to(table.weight.device)] = self._before(t, rows)
            self.optimizer.forget(table.weight, rows.to(table.weight.device))
            self.touched[t] = touched[~torch.isin(touched, rows)]
            self.protected[t] = _union(self.protected.get(t), rows)
            n += int(rows.numel())
        return n

    def extrapolate(self, factor: float) -> int:
        """Scale this method's update by `factor`: each row it updated goes from its value now to
        its value before + `factor` x (now - before) — task arithmetic's scaled task vector
        (Ilharco et al. 2023, "Editing Models with Task Arithmetic", eq. 1), on the sparse rows
        only. A rephrased question reads part of the slots its fact was written to (BENCHMARKS.md,
        issue 17), and a factor above 1 lets that part carry the answer. Rows keep their optimizer
        state. Returns the rows scaled. RuntimeError if `remember_originals` was not called before
        training; MemtuneError, with nothing changed, if a scaled value overflows the table's dtype."""
        if self.originals is None:
            raise RuntimeError("extrapolate needs the values from before training: call remember_originals() first")
        scaled = []
        with torch.no_grad():
            for t, table in enumerate(self.bank.values):
                rows = self.touched.get(t)
                if rows is None or rows.numel() == 0:
                    continue
                at = rows.to(table.weight.device)
                before = self._before(t, rows)
                values = before + factor * (table.weight[at] - before)
                if not torch.isfinite(values).all():
                    raise MemtuneError(f"extrapolate={factor}: the scaled value rows overflow "
                                       f"{str(table.weight.dtype).removeprefix('torch.')}: expected a smaller factor")
                scaled.append((table.weight, at, values))
            for weight, at, values in scaled:
                weight[at] = values
        return sum(int(at.numel()) for _, at, _ in scaled)

    def _before(self, t: int, rows: Tensor) -> Tensor:
        """The values of `rows` (sorted, of table `t`) from before their first update, on the
        table's device and dtype (`remember_originals`). RuntimeError for a row updated before it."""
        table = self.bank.values[t].weight
        saved = self.originals.get(t, [(rows[:0], table[:0].cpu())])
        kept, before = (torch.cat(parts) for parts in zip(*saved))
        if not torch.isin(rows, kept).all():
            raise RuntimeError("some rows were updated before remember_originals() was called: their values from "
                               "before are unknown")
        order = kept.argsort()
        kept, before = kept[order], before[order]
        return before[torch.searchsorted(kept, rows)].to(table.device, table.dtype)

    def begin(self) -> None:
        # the same data learned again after unwrite may move its own rows; other data may not
        mine = self.touched if self.freeze_learned and not self.relearn else {}
        parts = [self.protected, self.kept, self.earlier, mine]
        self.relearn = False
        self.frozen = {t: torch.unique(torch.cat([p[t] for p in parts if t in p])) for t in set().union(*parts)}

    def set_lr(self, lr: float) -> None:
        self.optimizer.lr = lr

    def select(self, usage: StepUsage) -> dict[str, Tensor]:
        """layer -> selected slots (sorted)."""
        selected = {}
        # Summed over ranks under torchrun, so that every rank selects the same rows.
        for layer, (slots, counts) in distributed.sum_counts(usage.counts()).items():
            frozen = self.frozen.get(self.table_of[layer])
            if frozen is not None:
                free = ~torch.isin(slots, frozen)
                slots, counts = slots[free], counts[free]
            if slots.numel() == 0:
                selected[layer] = slots
                continue
            kwargs = {"counts": counts, "generator": self.generator}
            if self.background is not None:
                kwargs |= {"df": self.background.df[layer][slots], "n_background": self.background.n_batches,
                           "df_total": self.background.df_total(layer)}
            selected[layer] = select_top(slots, self.ranker(**kwargs), self.config.top_t)
        return selected

    def step(self, usage: StepUsage | None) -> dict:
        assert usage is not None
        selected = self.select(usage)
        updated = touched = 0
        for t, table in enumerate(self.bank.values):
            layers = [k for k, owner in self.table_of.items() if owner == t]
            rows = torch.unique(torch.cat([selected[k] for k in layers]))
            distributed.reduce_row_grads(table, rows.to(table.weight.device))  # sum over ranks, selected rows only
            if self.originals is not None:  # rows updated for the first time: their values before, for unwrite
                new = rows[~torch.isin(rows, self.touched[t])] if t in self.touched else rows
                self.originals.setdefault(t, []).append((new, table.weight[new.to(table.weight.device)].detach().cpu()))
            updated += self.optimizer.step(table.weight, rows.to(table.weight.device))
            table.weight.grad = None
            self.touched[t] = _union(self.touched.get(t), rows)
            touched += self.touched[t].numel()
        return {"selected": {k: int(v.numel()) for k, v in selected.items()},
                "updated_rows": updated, "touched_rows": touched}

    def save(self, model: nn.Module, tokenizer, path: Path) -> None:
        from memtune.checkpoint import save_memory

        self.bank.set_record(False)
        save_memory(model, path, overwrite=True)




class _DenseMethod:
    """Shared by the baselines: AdamW over every trainable parameter."""

    name = "dense"
    model: nn.Module | None = None

    def __init__(self, lr: float, weight_decay: float = 0.0):
        self.lr = lr
        self.weight_decay = weight_decay

    def _make_optimizer(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        self.trainable = _count_trainable(model)
        self.model = model

    def begin(self) -> None:
        pass

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, usage: StepUsage | None) -> dict:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {}


class FullFinetuning(_DenseMethod):
    name = "full"

    def prepare(self, model: nn.Module) -> nn.Module:
        if get_memory_bank(model) is not None:
            raise MemtuneError("--method full trains a base model: pass a model without memory layers")
        for p in model.parameters():
            p.requires_grad_(True)
        self._make_optimizer(model)
        return model

    def save(self, model: nn.Module, tokenizer, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)


class LoRA(_DenseMethod):
    name = "lora"

    def __init__(self, lr: float, rank: int = 16, alpha: int = 32, dropout: float = 0.05,
                 target_modules: str | list[str] = "all-linear"):
        super().__init__(lr)
        self.rank, self.alpha, self.dropout, self.target_modules = rank, alpha, dropout, target_modules

    def prepare(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        if get_memory_bank(model) is not None:
            raise MemtuneError("--method lora adapts a base model: pass a model without memory layers")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, task_type="CAUSAL_LM")
        name = getattr(model.config, "name_or_path", None)  # as the user named it (load_base_model)
        model = get_peft_model(model, config)
        if name:  # peft records the resolved folder; an alias like smollm2-135m reloads anywhere
            model.peft_config["default"].base_model_name_or_path = name
        self._make_optimizer(model)
        return model

    def save(self, model: nn.Module, tokenizer, path: Path) -> None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
