"""The one training loop, shared by every method (SMF, full finetuning, LoRA, healing)."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from memtune import distributed
from memtune.batches import Example, collate, n_loss_tokens, token_loss_sum
from memtune.errors import MemtuneError, is_int, is_number
from memtune.methods import (
    DEFAULT_LR,
    METHODS,
    FullFinetuning,
    LoRA,
    SMFConfig,
    SparseMemoryFinetuning,
)
from memtune.rankers import RANKERS
from memtune.stats import Background, StepUsage

log = logging.getLogger(__name__)

# until learned: how often (in passes) the check asks the examples already answered right again;
# 100 element facts lost 10 learned ones to later updates when they were asked only at the end
RECHECK_EVERY = 5
# Until learned, the passes each question trains after it is first answered right: held-out
# paraphrases answered 24 / 41 / 45 / 45 % on countries with 0 / 10 / 20 / 30 alone (elements
# 3.8 / 6.2 / 10.0 / 11.2 %). With the recipe's word dropout and whole-statement loss, 5 against
# 10: elements 22.5 / 27.5 % with 1 / 4 of 50 known facts lost, states 51.2 % both with 0 / 1 of
# 28 lost, in 106 / 143 and 137 / 195 steps (BENCHMARKS.md, issue 17, fifth and sixth rounds).
CONSOLIDATE = 5
SCHEDULES = ("constant", "linear")


@dataclass
class LearnConfig:
    """How to learn new data. Every field is also a `memtune learn` option."""

    method: Literal["smf", "full", "lora"] = field(default="smf", metadata={"help": "smf, or a baseline: full, lora"})
    ranker: str = field(default="tfidf", metadata={"help": "SMF slot ranker: " + ", ".join(sorted(RANKERS))})
    top_t: int = field(
        default=1000,
        metadata={"help": "SMF: value rows updated per layer and step (the headline's; see BENCHMARKS.md)"},
    )
    optimizer: str = field(default="adam", metadata={"help": "SMF: adam (per-row state) or sgd"})
    lr: float | None = field(
        default=None,
        metadata={"help": "learning rate; default by method: smf adam 2.0, smf sgd 1e7 (zero-initialised values "
                  "get gradients of ~1e-6 per element: measured on SmolLM2-135M), full 2e-5, lora 5e-4"},
    )
    batch_size: int = field(default=10, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    epochs: int = field(default=50, metadata={
        "help": "passes over the data (with --until-learned: at most; element facts needed 34, BENCHMARKS.md)"})
    until_learned: bool = field(
        default=True,
        metadata={"help": "facts: before each pass, ask the model every question (greedy, as the probes do) and "
                  "train only those it still answers wrong; stop when none is left"})
    consolidate: int | None = field(default=None, metadata={
        "help": f"facts, with --until-learned: once a question is first answered right, its examples train this "
                f"many more passes before it is asked again: a margin beyond the first right answer, so that "
                f"rephrased questions find the fact (issue 17, BENCHMARKS.md) [default: {CONSOLIDATE} with "
                f"--until-learned]"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    max_minutes: float | None = field(
        default=None, metadata={"help": "stop training after this many minutes (the linear schedule then ends at "
                                "the earlier of the last step and this)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example (longer documents are split)"})
    count_positions: Literal["loss", "all"] = field(
        default="loss", metadata={"help": "SMF: slot reads that count: at positions predicting loss tokens, or all tokens"}
    )
    freeze_learned: bool = field(
        default=True, metadata={"help": "SMF: never update again the rows updated for earlier data (earlier learn "
                                "calls on this memory, the earlier chunks of a stream), so later data cannot "
                                "overwrite it"})
    protect_learned: bool = field(
        default=True, metadata={"help": "SMF: once data is learned, freeze every slot its text reads (all positions) "
                                "for later data"})
    schedule: Literal["constant", "linear"] = field(
        default="constant",
        metadata={"help": "learning rate: constant, or linear decay to 0 over each pass over new data (each chunk "
                  "of a stream starts again at --lr)"},
    )
    seed: int = field(default=0, metadata={"help": "data order and random ranker"})
    write_knn: int | None = field(default=None, metadata={
        "help": "SMF: slots each memory head reads per token while training (counted, ranked, updated), above the "
                "memory's knn: a wider write than read (reading stays at knn) [default: knn]"})
    query_noise: float = field(default=0.0, metadata={
        "help": "SMF: std of Gaussian noise added to each normalised memory query while training (units of the "
                "query's RMS; reading stays exact): rephrased questions' neighbouring slots are written too (issue 17: "
                "no gain measured)"})
    slot_dropout: float = field(default=0.0, metadata={
        "help": "SMF: probability that each slot a training read takes is left out (the others not rescaled), so "
                "a fact's answer must come from any part of its slots, as a rephrased question reads part of them "
                "(issue 17: +1-3 points measured; reading stays whole). 0: none"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(default="all-linear", metadata={"help": "LoRA target modules (comma-separated or all-linear)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MemtuneError(f"method={self.method!r} is invalid: expected one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise MemtuneError(f"schedule={self.schedule!r} is invalid: expected one of {', '.join(SCHEDULES)}")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "lora_rank"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise MemtuneError(f"{name}={value!r} is invalid: expected a positive integer")
        if self.consolidate is None:
            self.consolidate = CONSOLIDATE if self.until_learned else 0
        if not is_int(self.consolidate) or self.consolidate < 0:
            raise MemtuneError(f"consolidate={self.consolidate!r} is invalid: expected a non-negative integer")
        if self.consolidate and not self.until_learned:
            raise MemtuneError(f"consolidate={self.consolidate} follows until-learned training: drop "
                               "--no-until-learned (or --consolidate)")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps <= 0):
            raise MemtuneError(f"max_steps={self.max_steps!r} is invalid: expected a positive integer")
        for name in ("max_minutes", "lr"):  # (a YAML file can give any type)
            value = getattr(self, name)
            if value is not None and not (is_number(value) and 0 < value < float("inf")):
                raise MemtuneError(f"{name}={value!r} is invalid: expected a positive number")
        if self.lr is None:  # (an unknown SMF optimizer has none: SMFConfig says so)
            self.lr = DEFAULT_LR.get((self.method, self.optimizer if self.method == "smf" else "adamw"))
        if self.method == "smf":
            self.smf()  # checks the SMF options (ranker, top-T, optimizer, counted positions)
        else:  # SMF's freezing has nothing to act on in a dense method
            self.freeze_learned = self.protect_learned = False

    def smf(self) -> SMFConfig:
        """The SMF options, as the one object the method takes."""
        return SMFConfig(self.ranker, self.top_t, self.optimizer, self.lr, self.count_positions,
                         self.freeze_learned, self.protect_learned, self.seed, self.write_knn,
                         self.query_noise, self.slot_dropout)

    def to_dict(self) -> dict:
        return asdict(self)


# Options that act on memory slots (SMF) or on adapters (LoRA): another method refuses them.
SMF_ONLY = ("ranker", "top_t", "optimizer", "count_positions", "freeze_learned", "protect_learned", "write_knn",
            "query_noise", "slot_dropout")
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def check_options(method: str, given, smf_only: tuple[str, ...] = SMF_ONLY) -> None:
    """Refuse an option the user gave (`given`: names, as LearnConfig fields) that does nothing
    for `method`: one-line MemtuneError naming the first (as a command-line flag)."""
    unused = sorted(k for k in given if (method != "smf" and k in smf_only) or (method != "lora" and k in LORA_ONLY))
    if unused:
        kind = "SMF" if unused[0] in smf_only else "LoRA"
        raise MemtuneError(f"--{unused[0].replace('_', '-')} is for {kind}: method {method!r} does not use it")


class LoopConfig(Protocol):
    """The settings `train` reads: a `LearnConfig`, or healing's `HealConfig`."""

    lr: float  # the rate the schedule scales; `method.set_lr` gets it
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int | None
    max_minutes: float | None
    schedule: str
    seed: int
    count_positions: str
    until_learned: bool


def make_method(config: LearnConfig, background: Background | None, protect: Background | None = None):
    """The method `config` names; SMF ranks against `background` and never updates the slots
    `protect` read."""
    if config.method == "smf":
        return SparseMemoryFinetuning(config.smf(), background, protect)
    if protect is not None:
        raise MemtuneError(f"protect statistics are for SMF: method {config.method!r} updates every parameter it trains")
    if config.method == "full":
        return FullFinetuning(config.lr)
    targets = config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(",")
    return LoRA(config.lr, config.lora_rank, config.lora_alpha, config.lora_dropout, targets)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since `reset_peak_rss`, where Linux allows it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start a new peak-memory measurement (Linux: VmHWM := current RSS); False where the OS
    does not allow it (the peak then stays the process's lifetime peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cost_fields(step_start: float, run_start: float, real_tokens: int) -> dict:
    """The cost columns every method's metrics.jsonl shares: step time, throughput, peak RSS."""
    now = time.perf_counter()
    elapsed = now - step_start
    return {"step_time_s": round(elapsed, 4), "tokens_per_s": round(real_tokens / elapsed, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "elapsed_s": round(now - run_start, 2)}


def train(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    config: LoopConfig,
    method,
    on_step: Callable[[dict], None] | None = None,
    progress: bool = True,
    learned: Callable[[nn.Module, list[int]], list[bool]] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Run the method over `examples` for `config.epochs` (or `max_steps`); returns the
    (possibly wrapped) model and the per-step metrics. Called again with the returned model,
    training continues (optimizer state kept), as for the next chunk of a stream.

    With `config.until_learned` and a `learned` check ((model, indices) -> one bool per
    example index asked, e.g. `AnswerCheck`), each pass trains only the examples not yet
    learned: before a pass the check asks those still wrong, and every `RECHECK_EVERY` passes, or
    when none is left, the others again (later updates can undo an earlier answer: those are
    trained again); training stops only when every example is answered right at once; `epochs`
    is then a cap. With `config.consolidate` = K, an example the check finds right for the first
    time after a pass (not one right before any) trains K more passes without being asked (a
    margin beyond the first right answer), then is asked again like the others. At the end the
    check's last answer for every example is from the final model.

    The method's `loss(model, batch)`, when it has one, is the objective: a dict of scalars,
    each a mean over its micro-batch; "loss" is backpropagated (micro-batches weighted by their
    examples) and every entry is logged. Without it, the summed next-token loss over the step's
    loss tokens. A method with `train_mode = False` trains in eval mode (no dropout)."""
    if not examples:
        raise MemtuneError("no training examples: the data is empty")
    torch.manual_seed(config.seed)
    if method.model is None or method.model is not model:
        model = method.prepare(model)
    method.begin()
    forward_model = distributed.data_parallel(model)  # DDP for dense methods under torchrun
    bank = getattr(method, "bank", None)
    method_loss = getattr(method, "loss", None)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    per_step = config.batch_size * config.grad_accum
    steps_per_epoch = -(-len(examples) // per_step)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    check = learned if config.until_learned else None
    budget = None if config.max_minutes is None else 60 * config.max_minutes  # seconds
    history: list[dict] = []
    desc = method.name if method.name == "heal" else f"learn ({method.name})"
    bar = tqdm(total=total, desc=desc, disable=not (progress and distributed.is_main()))
    step = epoch = 0
    active = list(range(len(examples)))
    margin = getattr(config, "consolidate", 0) if check is not None else 0
    resting: dict[int, int] = {}  # example -> margin passes it still trains without being asked
    given: set[int] = set()  # examples that got their margin (once, when first answered right)
    start = time.perf_counter()
    try:
        while step < total and epoch < config.epochs:
            if check is not None:  # only what the model does not answer right yet (rank 0's view)
                # every RECHECK_EVERY passes all of them: an update since an example was right can undo it
                asked = [i for i in active if i not in resting]
                wrong = _still_wrong(check, model, asked, len(examples), everyone=epoch % RECHECK_EVERY == 0,
                                     resting=resting)
                if margin:  # right for the first time after training: its margin starts (not if right before)
                    for i in set(range(len(examples))) - set(wrong) - given - set(resting):
                        if epoch:
                            resting[i] = margin
                        given.add(i)
                active, left = sorted({*wrong, *resting}), len(wrong)
                bar.set_postfix(left=left, refresh=False)
                if not active:
                    break
            for i in list(resting):  # this pass is one of their margin passes
                resting[i] -= 1
                if not resting[i]:
                    del resting[i]
            model.train(getattr(method, "train_mode", True))
            epoch += 1
            order = [active[i] for i in torch.randperm(len(active), generator=generator).tolist()]
            for s in range(0, len(order), per_step):
                t0 = time.perf_counter()
                if step and budget is not None and t0 - start >= budget:
                    total = step
                if step >= total:
                    break
                lr = config.lr
                if config.schedule == "linear":  # to 0 at the last step, or at the time budget if earlier
                    done = step / total if budget is None else max(step / total, (t0 - start) / budget)
                    lr = config.lr * max(0.0, 1.0 - done)
                method.set_lr(lr)
                chunk = [examples[i] for i in order[s : s + per_step]]
                # Under torchrun this rank's share of the step (see memtune.distributed); a share
                # with nothing in it runs a stand-in weighted by zero.
                shares = distributed.local_micro_batches(chunk, config.batch_size)
                micro = [(collate(part, tokenizer.pad_token_id, config.count_positions), float(real))
                         for part, real in shares]
                n_tokens = int(distributed.sum_over_ranks(sum(n_loss_tokens(b["labels"]) * w for b, w in micro))[0])
                usage = StepUsage(bank) if bank is not None else None
                loss_sum = real_tokens = 0.0
                logged: dict[str, float] = {}  # the method's losses, weighted over micro-batches
                for i, (b, w) in enumerate(micro):
                    with distributed.sync_gradients(forward_model, last=i == len(micro) - 1):
                        if method_loss is None:
                            out = forward_model(input_ids=b["input_ids"].to(device),
                                                attention_mask=b["attention_mask"].to(device), use_cache=False)
                            loss = token_loss_sum(out.logits, b["labels"].to(device)) * w
                            (loss / max(n_tokens, 1)).backward()
                            loss_sum += loss.item()
                        else:
                            share = w * len(b["input_ids"]) / len(chunk)  # of the step's examples, all ranks
                            losses = method_loss(forward_model, b)
                            (losses["loss"] * share).backward()
                            for k, v in losses.items():
                                logged[k] = logged.get(k, 0.0) + v.item() * share
                    real_tokens += w * int(b["attention_mask"].sum())
                    if usage is not None:
                        usage.add(b["count_mask"] & bool(w))
                loss_sum, real_tokens = distributed.sum_over_ranks(loss_sum, real_tokens)
                real_tokens = int(real_tokens)
                if method_loss is None:
                    logged = {"loss": loss_sum / max(n_tokens, 1)}
                else:
                    logged = dict(zip(logged, distributed.sum_over_ranks(*logged.values())))
                info = method.step(usage)
                step += 1
                record = {"step": step, "epoch": epoch, "examples": len(chunk), "loss": logged.pop("loss"), **logged,
                          "loss_tokens": n_tokens, "lr": lr, **cost_fields(t0, start, real_tokens), **info}
                history.append(record)
                if on_step is not None:
                    on_step(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", **({"left": left} if check is not None else {}))
        if check is not None and active and (step >= total or epoch == config.epochs):  # the last pass's effect
            active = _still_wrong(check, model, active, len(examples), everyone=True)
        if check is not None:
            log.info("trained %d passes, %d steps: %d of %d examples answered right (until learned, cap %d passes)",
                     epoch, step, len(examples) - len(active), len(examples), config.epochs)
    finally:
        bar.close()
        model.eval()
    return model, history


def _still_wrong(check, model: nn.Module, active: list[int], n: int, everyone: bool = False,
                 resting: Collection[int] = ()) -> list[int]:
    """The examples of `active` the check finds wrong, and, when none is and none is `resting`
    (training would stop) or with `everyone`, those of the other n - |active| (but `resting`) it
    finds wrong now: an update since they were right can undo them. Rank 0's view, on every rank."""
    wrong = distributed.from_main([i for i, ok in zip(active, check(model, active)) if not ok]) if active else []
    others = sorted(set(range(n)) - set(active) - set(resting))
    if (everyone or not (wrong or resting)) and others:
        wrong += distributed.from_main([i for i, ok in zip(others, check(model, others)) if not ok])
    return sorted(wrong)
