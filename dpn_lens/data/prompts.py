"""Prompt text: the role-play template of the paper and rendering through a chat template."""

from __future__ import annotations

from typing import Any

__all__ = ["ROLEPLAY_TEMPLATE", "render_roleplay_prompt", "render_for_model", "uses_chat_template"]

ROLEPLAY_TEMPLATE = (
    "You will find a personality description followed by a question below. I want you to fully immerse "
    "yourself in the persona described.\n###Personality description: {description}\n###Question: {question}\n"
    "###Response:"
)
"""The role-play template of DPN-LE / NPTI (METHOD.md, "Contrastive data")."""


def render_roleplay_prompt(description: str, question: str) -> str:
    """Fill the role-play template (the user message, before any chat template).

    Example:
        >>> render_roleplay_prompt("You are calm.", "How was your day?").splitlines()[1]
        '###Personality description: You are calm.'
    """
    return ROLEPLAY_TEMPLATE.format(description=description.strip(), question=question.strip())


def uses_chat_template(model_or_tokenizer: Any) -> bool:
    """Whether prompts for this model go through its chat template (instruct models) or stay raw."""
    flag = getattr(model_or_tokenizer, "dpn_is_chat_model", None)
    if flag is not None:
        return bool(flag)
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    return bool(getattr(tokenizer, "chat_template", None))


def render_for_model(model_or_tokenizer: Any, user_text: str, chat: bool | None = None,
                     system_prompt: str | None = None) -> str:
    """Render one user message the way the model expects it, ending where the answer starts.

    Chat models get their chat template with the generation prompt appended (so the last token
    is the end of the assistant header, the token whose activation DPN-LE reads). Base models get
    the raw text.

    Example:
        >>> render_for_model(model, "Hi")           # doctest: +SKIP
        '<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if chat is None:
        chat = uses_chat_template(model_or_tokenizer)
    if not chat:
        return user_text if system_prompt is None else f"{system_prompt}\n\n{user_text}"
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": user_text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
