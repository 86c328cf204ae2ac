"""Step 1 of the data flow: contrastive prompts (high-pole vs low-pole) for one trait."""

from dpn_lens.data.contrastive import (
    DATA_DIR_ENV,
    ContrastivePair,
    ContrastiveSet,
    anthropic_persona_contrastive_set,
    embedded_contrastive_set,
    load_question_jsonl,
    personalitybench_contrastive_set,
    resolve_data_dir,
)
from dpn_lens.data.prompts import (
    OPTION_LETTERS,
    ROLEPLAY_TEMPLATE,
    multiple_choice_prompt,
    render_for_model,
    render_roleplay_prompt,
    uses_chat_template,
)

__all__ = [
    "DATA_DIR_ENV",
    "ContrastivePair",
    "ContrastiveSet",
    "anthropic_persona_contrastive_set",
    "embedded_contrastive_set",
    "load_question_jsonl",
    "personalitybench_contrastive_set",
    "resolve_data_dir",
    "ROLEPLAY_TEMPLATE",
    "OPTION_LETTERS",
    "multiple_choice_prompt",
    "render_for_model",
    "render_roleplay_prompt",
    "uses_chat_template",
]
