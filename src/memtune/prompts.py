"""How questions and answers become token ids — one place, so that training, generation and
every probe read exactly the same ids.

With a chat template (instruct models) a question is a user turn and the answer the assistant
turn, *as the template renders it*: whatever the template writes between the generation prompt
and the answer, then the answer, then the token that closes an assistant turn (`<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>` ... — not necessarily `tokenizer.eos_token`). The template writes
its own BOS, so its text is encoded without special tokens, as `apply_chat_template` does.
Without a template: `Question: ...\\nAnswer:` and ` answer` + EOS, after the tokenizer's own
BOS (once: never doubled, and no EOS the tokenizer may append to plain text).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_SENTINEL = "MEMTUNEANSWERSENTINEL"


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _use_chat(tokenizer: PreTrainedTokenizerBase, chat: bool | None) -> bool:
    return has_chat_template(tokenizer) if chat is None else chat


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before plain text: [bos] for Llama-style tokenizers, [] for
    Qwen or SmolLM. (Found by encoding a word both ways, so suffixes like an EOS are ignored.)"""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain text as the model reads it from the start: the tokenizer's prefix (BOS) once —
    not again when the text already begins with it — then the text's tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix = special_prefix(tokenizer)
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return list(dict.fromkeys([*tokenizer.all_special_tokens, *added]))


def assistant_turn(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(opening, closing): the text the chat template writes between the generation prompt and
    an assistant's answer, and after it up to the first special token (the end of the turn;
    a newline or the next turn after it is not part of what the model says). Falls back to
    ("", eos) when the template cannot render an assistant turn."""
    eos = tokenizer.eos_token or ""
    user = [{"role": "user", "content": "Q"}]
    try:
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False, tokenize=False)
    except Exception:  # a template may refuse these messages (jinja raise_exception)
        return "", eos
    at = full.find(_SENTINEL)
    if at < 0:
        return "", eos
    opening = full[len(prompt) : at] if full.startswith(prompt) else ""
    closing = full[at + len(_SENTINEL) :]
    found = [(closing.find(t), t) for t in _special_tokens(tokenizer) if t and t in closing]
    if found:
        i, token = min(found, key=lambda x: (x[0], -len(x[1])))
        return opening, closing[: i + len(token)]
    return opening, closing.rstrip() or eos


def end_of_answer(tokenizer: PreTrainedTokenizerBase, chat: bool | None = None) -> str:
    """The special token that ends a trained answer: the template's end of an assistant turn,
    or EOS without a template."""
    if not _use_chat(tokenizer, chat):
        return tokenizer.eos_token or ""
    closing = assistant_turn(tokenizer)[1]
    found = [t for t in _special_tokens(tokenizer) if t and closing.endswith(t)]
    return max(found, key=len) if found else (tokenizer.eos_token or "")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, chat: bool | None = None) -> list[int]:
    """Token ids at which generation ends an answer: EOS and the end-of-answer token."""
    ids = [tokenizer.eos_token_id]
    end = end_of_answer(tokenizer, chat)
    if end:
        ids += tokenizer.convert_tokens_to_ids([end])
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, chat: bool | None = None) -> str:
    """The text a model continues to answer `question`."""
    if _use_chat(tokenizer, chat):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return f"Question: {question}\nAnswer:"


def answer_opening(tokenizer: PreTrainedTokenizerBase, chat: bool | None = None) -> str:
    """The text between the prompt and the answer's words in a training example."""
    return assistant_turn(tokenizer)[0] if _use_chat(tokenizer, chat) else " "


def answer_suffix(tokenizer: PreTrainedTokenizerBase, answer: str, chat: bool | None = None) -> str:
    """The text that follows the prompt in a training example: the answer as the template
    renders an assistant turn (or ` answer` + EOS)."""
    if _use_chat(tokenizer, chat):
        opening, closing = assistant_turn(tokenizer)
        return f"{opening}{answer}{closing}"
    return f" {answer}{tokenizer.eos_token or ''}"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, questions: list[str], chat: bool | None = None) -> list[list[int]]:
    """Token ids of each question's prompt: a chat template's text as it is (it writes its own
    BOS), plain prompts after the tokenizer's BOS."""
    chat = _use_chat(tokenizer, chat)
    texts = [build_prompt(tokenizer, q, chat) for q in questions]
    if chat:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encode_text(tokenizer, t) for t in texts]


def encode_answers(tokenizer: PreTrainedTokenizerBase, answers: list[str], chat: bool | None = None) -> list[list[int]]:
    """Token ids of each answer and its end (what follows the prompt in training)."""
    if _use_chat(tokenizer, chat):
        opening, closing = assistant_turn(tokenizer)  # rendered once for all answers
        texts = [f"{opening}{a}{closing}" for a in answers]
    else:
        texts = [answer_suffix(tokenizer, a, chat=False) for a in answers]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
