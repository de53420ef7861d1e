"""Healing: train a retrofitted model's memory parameters on general text, so that a model whose
FFNs were replaced by memories (``replace`` mode) recovers what the replacement cost.

Objectives, weighted and summed:

- LM: next-token cross-entropy on the data's labelled tokens (documents: all; QA: answers);
- distillation: KL(original ‖ retrofitted) of the next-token distributions at every real
  token, where the original is the *same* model with its memories bypassed and its FFNs
  restored (`memtune.retrofit.bypass_memory`) — no second copy of the model;
- layer-wise: each memory layer's output against the output of the FFN it stands in for, at
  the same input. Alone it needs no forward above the last memory layer and no logits, so a
  step costs a fraction of the others' (SmolLM2-135M, memory at layer 15, CPU: 6–10× less).

Only memory parameters train; the base stays frozen and bitwise identical. A value table's
gradient is sparse (just the rows read), so its rows are updated by `SparseAdam`, whose state
exists only for rows ever read; the dense memory parameters by AdamW, the lookup (query, keys)
at its own, low, learning rate. Healing is a method (`Heal`) of the one training loop,
`memtune.train.train`. A recovery report compares held-out perplexity of the original, the
retrofitted model before healing, and after.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memtune.batches import Example, n_loss_tokens, token_loss_sum
from memtune.errors import MemtuneError, is_int, is_number
from memtune.memory import MemoryBank
from memtune.retrofit import (
    MemoryFFN,
    bypass_memory,
    freeze_base,
    memory_ffns,
    memory_parameters,
    require_memory_bank,
)
from memtune.sparse_optim import SparseAdam
from memtune.stats import StepUsage
from memtune.train import SCHEDULES, peak_rss_mb, train

log = logging.getLogger(__name__)

VALUES_PREFIX = "memory.values."


@dataclass
class HealConfig:
    """How to heal. Every field is also a `memtune heal` option."""

    lm_weight: float = field(default=1.0, metadata={"help": "weight of the LM loss (next-token cross-entropy)"})
    distill_weight: float = field(
        default=1.0, metadata={"help": "weight of the distillation loss KL(original ‖ retrofitted)"}
    )
    local_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the layer-wise loss: squared error of each memory layer's output against "
                  "the original FFN's, relative to the FFN's; alone, the forward stops at the last memory layer "
                  "(several times cheaper per token)"},
    )
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the dense memory parameters "
                                                        "(gate and out; the lookup has --lookup-lr)"})
    value_lr: float = field(
        default=0.1, metadata={"help": "sparse Adam learning rate of the value rows (zero-initialised values "
                               "need large steps)"}
    )
    lookup_lr: float | None = field(
        default=1e-5,
        metadata={"help": "AdamW learning rate of the lookup (query projection, query norm, keys); None: --lr. "
                  "Kept low because Adam's normalised steps move every token's query the same way and the "
                  "lookup collapses onto a few slots (watch value_rows in metrics.jsonl)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the dense memory parameters"})
    schedule: Literal["constant", "linear"] = field(
        default="linear",
        metadata={"help": "learning rates: constant, or linear decay to 0 at the end of training (the end is the "
                  "earlier of the last step and --max-minutes)"},
    )
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    max_length: int = field(default=128, metadata={"help": "tokens per sequence (longer documents are split)"})
    epochs: int = field(default=1, metadata={"help": "passes over the data"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    max_minutes: float | None = field(default=None, metadata={"help": "stop training after this many minutes"})
    seed: int = field(default=0, metadata={"help": "data order"})
    eval_data: str = field(default="prose:heldout", metadata={"help": "held-out text for the recovery report"})
    eval_limit: int | None = field(default=None, metadata={"help": "use the first N held-out documents only"})
    eval_max_length: int = field(default=512, metadata={"help": "perplexity window in tokens"})
    eval_stride: int = field(default=256, metadata={"help": "perplexity window stride in tokens"})
    min_recovery: float = field(
        default=0.8, metadata={"help": "warn when healing recovers less than this fraction of the lost perplexity"}
    )
    # The training loop's other settings (`memtune.train.LoopConfig`), fixed for healing: one
    # batch per step, every example every pass, and no slot counting (every row read is updated).
    grad_accum: ClassVar[int] = 1
    until_learned: ClassVar[bool] = False
    count_positions: ClassVar[str] = "all"

    def __post_init__(self) -> None:
        for name in ("lm_weight", "distill_weight", "local_weight", "weight_decay"):
            value = getattr(self, name)
            if not (is_number(value) and 0 <= value < math.inf):
                raise MemtuneError(f"{name}={value!r} is invalid: expected a non-negative number")
        if self.lm_weight == 0 and self.distill_weight == 0 and self.local_weight == 0:
            raise MemtuneError("lm_weight, distill_weight and local_weight are all 0: nothing to train; "
                               "give at least one a positive weight")
        for name in ("lr", "value_lr", "lookup_lr"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and 0 < value < math.inf):
                raise MemtuneError(f"{name}={value!r} is invalid: expected a positive number")
        for name in ("batch_size", "max_length", "epochs", "eval_max_length", "eval_stride"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise MemtuneError(f"{name}={value!r} is invalid: expected a positive integer")
        for name in ("max_steps", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                raise MemtuneError(f"{name}={value!r} is invalid: expected a positive integer")
        if self.max_minutes is not None and not (is_number(self.max_minutes) and self.max_minutes > 0):
            raise MemtuneError(f"max_minutes={self.max_minutes!r} is invalid: expected a positive number")
        if not (is_number(self.min_recovery) and 0 <= self.min_recovery <= 1):
            raise MemtuneError(f"min_recovery={self.min_recovery!r} is invalid: expected a fraction between 0 and 1")
        if self.schedule not in SCHEDULES:
            raise MemtuneError(f"schedule={self.schedule!r} is invalid: expected one of {', '.join(SCHEDULES)}")
        if self.eval_stride > self.eval_max_length:
            raise MemtuneError(f"eval_stride={self.eval_stride} is invalid: expected at most "
                               f"eval_max_length={self.eval_max_length}")

    def to_dict(self) -> dict:
        return asdict(self)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over real positions of KL(teacher ‖ student) of next-token distributions.

    student_logits, teacher_logits: (B, T, V); mask: (B, T), 1 at real tokens. Exactly 0 when
    the two logits are bitwise equal (kl_div computes p_t · (log p_t - log p_s) elementwise)."""
    m = mask.to(student_logits.device).bool()
    log_s = F.log_softmax(student_logits[m].float(), dim=-1)  # (N, V)
    log_t = F.log_softmax(teacher_logits[m].float(), dim=-1)  # (N, V)
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / max(int(m.sum()), 1)


def is_lookup_param(name: str) -> bool:
    """Query projection, query norm and keys: what decides which slots a token reads."""
    leaf = name.split(".")
    return name.startswith("memory.layers.") and ("query" in leaf or "query_norm" in leaf or leaf[-1] == "keys")


class MemoryOptimizer:
    """AdamW for the dense memory parameters (the lookup at its own lr), SparseAdam for the
    value rows read in a step."""

    def __init__(self, model: nn.Module, lr: float, value_lr: float, weight_decay: float = 0.0,
                 lookup_lr: float | None = None):
        self.bank: MemoryBank = require_memory_bank(model)
        dense = [(name, p) for name, p in memory_parameters(model) if not name.startswith(VALUES_PREFIX)]
        groups = [{"params": [p for n, p in dense if is_lookup_param(n)], "lr": lr if lookup_lr is None else lookup_lr},
                  {"params": [p for n, p in dense if not is_lookup_param(n)], "lr": lr}]
        groups = [g for g in groups if g["params"]]
        self.dense = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay) if groups else None
        self.values = SparseAdam(value_lr)
        self.base_lrs = [g["lr"] for g in self.dense.param_groups] if self.dense is not None else []
        self.base_value_lr = value_lr

    def scale_lr(self, factor: float) -> None:
        """Set every learning rate to `factor` times its initial value."""
        if self.dense is not None:
            for group, lr in zip(self.dense.param_groups, self.base_lrs):
                group["lr"] = lr * factor
        self.values.lr = self.base_value_lr * factor

    def step(self) -> int:
        """Apply the step's gradients; returns the number of value rows updated."""
        if self.dense is not None:
            self.dense.step()
            self.dense.zero_grad(set_to_none=True)
        updated = 0
        for table in self.bank.values:
            grad = table.weight.grad
            if grad is None:
                continue
            grad = grad.coalesce()  # several layers sharing a table sum their sparse reads
            table.weight.grad = grad
            updated += self.values.step(table.weight, grad.indices()[0])  # every row read
            table.weight.grad = None
        return updated


class _StopForward(Exception):
    """Raised by the last memory layer's hook when nothing above it is needed."""


class LayerwiseLoss:
    """Forward hooks on the memory-wrapped FFNs that collect, at real tokens, the squared error
    of each wrapper's output against the original FFN's output at the same input, and the
    original's squared norm: loss = Σ err² / Σ ffn². 1.0 for a zero memory in replace mode."""

    def __init__(self, model: nn.Module, mask: Tensor, stop_after_last: bool = False):
        """mask: (B, T), 1 at the real tokens of the batch about to run."""
        self.wrappers = memory_ffns(model)
        self.stop_after_last = stop_after_last
        self.mask = mask.bool()
        self.err: list[Tensor] = []
        self.norm: list[Tensor] = []
        self.handles = [w.register_forward_hook(self._hook) for w in self.wrappers]

    def _hook(self, module: MemoryFFN, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module.bypass:
            return
        x = inputs[0]  # (B, T, d)
        with torch.no_grad():
            target = module.ffn(x).float()  # (B, T, d)
        m = self.mask.to(x.device)  # (B, T)
        self.err.append((output.float() - target)[m].square().sum())
        self.norm.append(target[m].square().sum())
        if self.stop_after_last and module is self.wrappers[-1]:
            raise _StopForward

    def loss(self) -> Tensor:
        return torch.stack(self.err).sum() / torch.stack(self.norm).sum().clamp_min(1e-12)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def heal_losses(model: nn.Module, batch: dict[str, Tensor], config: HealConfig) -> dict[str, Tensor]:
    """The weighted objectives on one batch: {"loss", "lm_loss"?, "distill_loss"?, "local_loss"?}."""
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    teacher = None
    if config.distill_weight > 0:
        with torch.no_grad(), bypass_memory(model):
            teacher = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    local_only = config.lm_weight == 0 and config.distill_weight == 0
    layerwise = LayerwiseLoss(model, mask, stop_after_last=local_only) if config.local_weight > 0 else None
    out: dict[str, Tensor] = {}
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    except _StopForward:
        logits = None
    finally:
        if layerwise is not None:
            layerwise.remove()
    total = torch.zeros((), dtype=torch.float32, device=device)
    if layerwise is not None:
        out["local_loss"] = layerwise.loss()
        total = total + config.local_weight * out["local_loss"]
    if logits is not None and config.lm_weight > 0:
        labels = batch["labels"].to(device)
        out["lm_loss"] = token_loss_sum(logits, labels) / max(n_loss_tokens(labels), 1)
        total = total + config.lm_weight * out["lm_loss"]
    if logits is not None and teacher is not None:
        out["distill_loss"] = distillation_loss(logits, teacher, mask)
        total = total + config.distill_weight * out["distill_loss"]
    out["loss"] = total
    return out


class Heal:
    """Healing as a method of the one training loop: the memory parameters train (base frozen)
    by `MemoryOptimizer` on the objectives of `heal_losses`, in eval mode, since the original's
    distributions (the targets) must not depend on dropout."""

    name = "heal"
    train_mode = False
    model: nn.Module | None = None

    def __init__(self, config: HealConfig):
        self.config = config

    def prepare(self, model: nn.Module) -> nn.Module:
        c = self.config
        require_memory_bank(model)
        freeze_base(model)
        self.optimizer = MemoryOptimizer(model, c.lr, c.value_lr, c.weight_decay, c.lookup_lr)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.model = model
        return model

    def begin(self) -> None:
        pass

    def set_lr(self, lr: float) -> None:
        """`lr`: the scheduled `config.lr`; every learning rate keeps its ratio to it."""
        self.optimizer.scale_lr(lr / self.config.lr)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return heal_losses(model, batch, self.config)

    def step(self, usage: StepUsage | None) -> dict:
        return {"value_rows": self.optimizer.step(), "value_lr": self.optimizer.values.lr}

    def save(self, model: nn.Module, tokenizer, path: Path) -> None:
        from memtune.checkpoint import save_memory

        save_memory(model, path, overwrite=True)


def heal(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    config: HealConfig,
    on_step=None,
    progress: bool = True,
) -> list[dict]:
    """Train the memory parameters of `model` (in place) on `examples`; returns per-step metrics.

    Runs `config.epochs` passes, or fewer when `max_steps` or `max_minutes` is reached."""
    if not examples:
        raise MemtuneError("no healing examples: the data is empty")
    _, history = train(model, tokenizer, examples, config, Heal(config), on_step, progress)
    return history


def recovered_fraction(base: float, replaced: float, healed: float) -> float | None:
    """(replaced - healed) / (replaced - base): 1 = all the lost perplexity recovered. None when
    the retrofit lost nothing (nothing to recover)."""
    lost = replaced - base
    if not lost > 0:
        return None
    return (replaced - healed) / lost


def held_out_perplexity(model: nn.Module, tokenizer, texts: list[str], config: HealConfig,
                        bypass: bool = False, progress: bool = True) -> float:
    """Sliding-window perplexity of `texts` (of the original model when `bypass`)."""
    from memtune.probes import perplexity

    if bypass:
        with bypass_memory(model):
            result = perplexity(model, tokenizer, texts, config.eval_max_length, config.eval_stride, progress=progress)
    else:
        result = perplexity(model, tokenizer, texts, config.eval_max_length, config.eval_stride, progress=progress)
    return result["perplexity"]


@dataclass
class HealRun:
    model: str
    out: str
    config: HealConfig
    data: str = "prose:background"
    format: str = "auto"
    limit: int | None = None
    overwrite: bool = False
    progress: bool = True


def run_heal(run: HealRun) -> dict:
    """Heal `run.model` (a memory checkpoint) on `run.data`; writes `run.out/` with config.json,
    metrics.jsonl, model/ (the healed memory checkpoint) and results.json (with the recovery
    report). Returns the results."""
    from memtune.checkpoint import save_memory
    from memtune.data import load_documents
    from memtune.io import check_output_free, run_folder
    from memtune.runs import load_examples, provenance
    from memtune.models import load_model, portable_name

    cfg = run.config
    check_output_free(run.out, run.overwrite)
    model, tokenizer = load_model(run.model)
    require_memory_bank(model)
    kind, examples = load_examples(run.data, tokenizer, run.format, cfg.max_length, run.limit)
    texts = [d.text for d in load_documents(cfg.eval_data, limit=cfg.eval_limit)]
    if not texts:
        raise MemtuneError(f"eval_data={cfg.eval_data!r} holds no documents")
    with run_folder(run.out, run.overwrite) as folder:
        folder.write_config({"model": portable_name(run.model), "data": portable_name(run.data), "format": kind,
                             "limit": run.limit, "memory": require_memory_bank(model).config.to_dict(),
                             "heal": cfg.to_dict()})
        ppl_base = held_out_perplexity(model, tokenizer, texts, cfg, bypass=True, progress=run.progress)
        ppl_before = held_out_perplexity(model, tokenizer, texts, cfg, progress=run.progress)
        log.info("held-out perplexity on %s: original %.3f, retrofitted %.3f", cfg.eval_data, ppl_base, ppl_before)
        start = time.perf_counter()
        history = heal(model, tokenizer, examples, cfg, on_step=folder.log, progress=run.progress)
        train_time = time.perf_counter() - start
        ppl_after = held_out_perplexity(model, tokenizer, texts, cfg, progress=run.progress)
        save_memory(model, folder.path / "model", overwrite=True, extra={"healed_from": portable_name(run.model)})
        fraction = recovered_fraction(ppl_base, ppl_before, ppl_after)
        results = {
            "examples": len(examples), "steps": len(history),
            "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
            "perplexity": {"data": cfg.eval_data, "base": ppl_base, "replaced": ppl_before, "healed": ppl_after},
            "recovered_fraction": fraction, "min_recovery": cfg.min_recovery,
            "recovered": None if fraction is None else fraction >= cfg.min_recovery,
            "train_time_s": round(train_time, 2),
            "mean_step_time_s": round(sum(h["step_time_s"] for h in history) / len(history), 4),
            "peak_rss_mb": round(peak_rss_mb(), 1), **provenance(),
        }
        folder.write_results(results)
    _log_report(results, run.out)
    return results


def _log_report(results: dict, out: str | Path) -> None:
    p, fraction = results["perplexity"], results["recovered_fraction"]
    log.info("healed in %d steps (%.0f s), loss %.3f -> %.3f; held-out perplexity: original %.3f, "
             "retrofitted %.3f, healed %.3f; run saved to %s", results["steps"], results["train_time_s"],
             results["first_loss"], results["final_loss"], p["base"], p["replaced"], p["healed"], out)
    if fraction is None:
        log.info("the retrofitted model lost no perplexity: nothing to recover")
    elif fraction < results["min_recovery"]:
        log.warning("healing recovered %.1f%% of the lost perplexity, short of --min-recovery %.0f%%: "
                    "heal longer, raise --value-lr/--lr, or use more data", 100 * fraction, 100 * results["min_recovery"])
    else:
        log.info("healing recovered %.1f%% of the lost perplexity", 100 * fraction)
