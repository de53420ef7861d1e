"""How questions become model inputs — one place, so training and probing format alike.

With a chat template (instruct models) a question is a user turn and the answer the assistant
turn; without one, `Question: ...\nAnswer: ...`.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, chat: bool | None = None) -> str:
    """The text a model continues to answer `question`."""
    if chat is None:
        chat = has_chat_template(tokenizer)
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return f"Question: {question}\nAnswer:"


def answer_suffix(tokenizer: PreTrainedTokenizerBase, answer: str, chat: bool | None = None) -> str:
    """The text that follows the prompt in a training example: the answer and its end marker."""
    if chat is None:
        chat = has_chat_template(tokenizer)
    if chat:
        end = tokenizer.eos_token or ""
        return f"{answer}{end}"
    return f" {answer}{tokenizer.eos_token or ''}"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, questions: list[str], chat: bool | None = None) -> list[list[int]]:
    """Token ids of each question's prompt. Special tokens (BOS) are added only without a chat
    template — a template writes its own."""
    if chat is None:
        chat = has_chat_template(tokenizer)
    texts = [build_prompt(tokenizer, q, chat) for q in questions]
    return tokenizer(texts, add_special_tokens=not chat)["input_ids"]
