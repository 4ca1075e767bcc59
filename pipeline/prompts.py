"""Prompt construction shared by every stage: one image-question turn in the chat format.

Owns how a question becomes the model's input text (image placeholder first, then the question,
then the generation prompt) and the answer normalisation used for exact match. Must not load
models or data.
"""

from __future__ import annotations

import re


def messages_for(question: str) -> list[dict]:
    """The chat messages of one image-question turn (the image comes before the question)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def prompt_text(processor, question: str) -> str:
    """The prompt string with one image placeholder, ending in the assistant's generation prompt."""
    return processor.apply_chat_template(messages_for(question), add_generation_prompt=True,
                                         tokenize=False)


def normalise_answer(text: str) -> str:
    """Lower-case, strip, drop trailing punctuation and a leading article: 'The Red.' -> 'red'."""
    text = text.strip().lower()
    text = re.sub(r"[\s.!?,;:]+$", "", text)
    return re.sub(r"^(the|a|an)\s+", "", text)
