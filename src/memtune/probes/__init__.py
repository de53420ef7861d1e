"""Probes: what a model learned and what it lost.

======================  =====================================================================
`qa_accuracy`           generated answers: exact match, F1, contains; on paraphrases too
`perplexity`            sliding-window perplexity on text
`drift`                 KL of next-token distributions from the base model (no labels)
`choice_accuracy`       multiple choice by (length-normalised) log-likelihood
`answer_loss`           mean loss on reference answers
`lm_eval`               any lm-evaluation-harness task on an in-memory model (extra ``lm-eval``)
======================  =====================================================================

Every probe takes a loaded model — memory checkpoint, PEFT adapter or full model alike, as
`memtune.models.load_model` returns them — and returns a JSON-able dict. `Prober` runs the
probes a `ProbeConfig` names, one number each: what a model learned and what it lost.
"""

from memtune.probes.drift import base_view, drift
from memtune.probes.harness import lm_eval
from memtune.probes.likelihood import answer_loss, choice_accuracy, perplexity
from memtune.probes.qa import exact_match, is_correct, normalize_answer, qa_accuracy, token_f1
from memtune.probes.runner import ProbeConfig, Prober

__all__ = [
    "answer_loss", "base_view", "choice_accuracy", "drift", "exact_match", "is_correct", "lm_eval",
    "normalize_answer", "perplexity", "ProbeConfig", "Prober", "qa_accuracy", "token_f1",
]
