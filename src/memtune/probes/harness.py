"""A bridge to EleutherAI's lm-evaluation-harness for a model already in memory — a memory
model, a PEFT model or a full model — so any harness task (or a local task YAML) runs on
exactly the weights the other probes see. Needs the optional extra: ``pip install 'memtune[lm-eval]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from memtune.errors import MemtuneError

log = logging.getLogger(__name__)


def lm_eval(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Run harness `tasks` (names, or tasks defined by YAML files under `include_path`).

    Returns ``{"results": {task: {metric: value}}, "n_samples": {...}, "versions": {...}}``.
    """
    try:
        import lm_eval as harness
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MemtuneError("the lm-eval probe needs lm-evaluation-harness: pip install 'memtune[lm-eval]'") from None
    if not tasks:
        raise MemtuneError("the lm-eval probe needs at least one task: pass --tasks NAME[,NAME]")
    # A PEFT model's underlying transformer still holds the injected adapter layers.
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MemtuneError(
            f"unknown lm-eval task {unknown[0]!r}: expected a harness task name or a task defined "
            "in a YAML file under --include-path"
        )
    out = harness.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=False, bootstrap_iters=0,
    )
    if out is None:  # only on non-zero ranks of a distributed run
        raise MemtuneError("lm-eval returned no results")
    results = {  # "acc,none" -> "acc"; standard errors and non-numbers dropped
        task: {k.split(",")[0]: v for k, v in metrics.items()
               if isinstance(v, int | float) and "_stderr" not in k}
        for task, metrics in out["results"].items()
    }
    return {"results": results, "n_samples": out.get("n-samples"), "versions": out.get("versions")}
