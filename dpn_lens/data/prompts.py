"""Prompt text: the role-play template of the paper, multiple-choice prompts, and chat-template rendering."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ROLEPLAY_TEMPLATE", "render_roleplay_prompt", "render_for_model", "uses_chat_template",
           "multiple_choice_prompt", "OPTION_LETTERS"]

ROLEPLAY_TEMPLATE = (
    "You will find a personality description followed by a question below. I want you to fully immerse "
    "yourself in the persona described.\n###Personality description: {description}\n###Question: {question}\n"
    "###Response:"
)
"""The role-play template of DPN-LE / NPTI (docs/METHOD.md, "Contrastive data")."""


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


OPTION_LETTERS = "ABCDEFGH"
"""Letters of multiple-choice options, in order."""


def multiple_choice_prompt(question: str, choices: Sequence[str], question_prefix: str = "Question: ",
                           option_format: str = "{letter}. {choice}", options_header: str | None = None,
                           instruction: str | None = None, answer_cue: str = "Answer:") -> str:
    """One multiple-choice prompt: question, lettered options, an optional instruction, the answer cue.

    The one builder behind the questionnaire items (``evaluation.trait``), the lettered capability
    items (MMLU) and the MMLU/ARC attribution examples of the multifunction study; lines are joined
    with ``"\n"`` and the question is stripped.

    Example:
        >>> print(multiple_choice_prompt("What is 2+2? ", ["3", "4"]))
        Question: What is 2+2?
        A. 3
        B. 4
        Answer:
    """
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"{len(choices)} choices, but options are lettered {OPTION_LETTERS[0]}-{OPTION_LETTERS[-1]}")
    lines = [f"{question_prefix}{question.strip()}"]
    if options_header is not None:
        lines.append(options_header)
    lines += [option_format.format(letter=letter, choice=choice) for letter, choice in zip(OPTION_LETTERS, choices)]
    if instruction is not None:
        lines.append(instruction)
    lines.append(answer_cue)
    return "\n".join(lines)
