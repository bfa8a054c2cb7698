"""Prompt templates and the prompt text of a record, as the model sees it.

Used by ``qae eval`` and by the trainer alike, so a problem is asked the same way in
training and in evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qae.core.registry import Registry
from qae.eval.datasets import PromptRecord

__all__ = ["build_prompt", "prompt_templates", "register_template"]

prompt_templates: Registry[Callable[[str], str]] = Registry("prompt template", "template")


def register_template(name: str) -> Callable[[Callable[[str], str]], Callable[[str], str]]:
    """Decorator: register ``fn(problem) -> user message`` as a prompt template."""
    return prompt_templates.decorator(name)


@register_template("dapo")
def _dapo(problem: str) -> str:
    # The DAPO math prompt: the answer goes on a final "Answer:" line.
    return (
        "Solve the following math problem step by step. The last line of your response "
        "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
        f"to the problem.\n\n{problem}\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )


@register_template("boxed")
def _boxed(problem: str) -> str:
    return f"{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@register_template("raw")
def _raw(problem: str) -> str:
    return problem


def build_prompt(record: PromptRecord, tokenizer: Any, template: str) -> tuple[str, bool]:
    """The prompt text for ``record`` and whether it already holds the special tokens.

    Records with chat messages use them as they are; others get ``template`` applied to the
    problem as one user message. With a chat template on the tokenizer the messages go
    through it (with the generation prompt); without one the message contents are joined.
    """
    if record.messages is not None:
        messages = [dict(m) for m in record.messages]
    else:
        messages = [{"role": "user", "content": prompt_templates.get(template)(record.problem)}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    return "\n\n".join(m["content"] for m in messages), False
