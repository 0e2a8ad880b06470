"""A chat template is a few format strings; encoding gives ``input_ids`` and ``labels`` with
loss on assistant turns only (or on every turn with ``train_on_prompt``; on the last turn
only with ``mask_history``).

Families register their template in their own file (``register_template``) by naming a
generic format below plus their plugin; a lookup that misses loads the families once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmtune.constants import IGNORE_INDEX


@dataclass(frozen=True)
class Template:
    """``{content}`` is the message text. ``prefix`` opens every conversation (e.g. BOS);
    ``system`` renders the system prompt (``default_system`` when the sample has none);
    ``user`` renders a user turn including the assistant's opening (the generation prompt);
    ``assistant`` renders the answer including its end-of-turn marker, which is trained;
    ``suffix`` closes a conversation that ends with an answer (trained with that answer)."""

    name: str
    user: str
    assistant: str
    system: str = "{content}"
    prefix: str = ""
    default_system: str = ""
    plugin: str = "base"
    stop_words: tuple[str, ...] = ()
    #: put the system prompt inside the first user turn (models without a system role)
    system_in_user: bool = False
    #: put it inside the last user turn instead (Mistral's tokenizers from v2 on, Pixtral)
    system_in_last_user: bool = False
    #: after the last answer: the EOS of formats whose turns end where the next role starts (GLM)
    suffix: str = ""

    def bind(self, name: str, plugin: str, **changes: Any) -> Template:
        return dataclasses.replace(self, name=name, plugin=plugin, **changes)

    # ---------------------------------------------------------------- rendering
    def render_turns(self, messages: Sequence[dict[str, str]], system: str | None = None) -> list[tuple[str, str]]:
        """(prompt text, answer text) per user/assistant pair, the first prompt carrying the
        prefix and system prompt. A trailing user turn gets an empty answer."""
        system = self.default_system if system is None else system
        pairs: list[tuple[str, str]] = []
        pending: str | None = None
        first = True
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system":
                system = content
                continue
            if role == "user":
                head = ""
                if first:
                    head = self.prefix
                    if system and not (self.system_in_user or self.system_in_last_user):
                        head += self.system.format(content=system)
                    elif system and self.system_in_user:
                        content = f"{system}\n\n{content}"
                    first = False
                if system and self.system_in_last_user and i == last_user:
                    content = f"{system}\n\n{content}"
                pending = head + self.user.format(content=content)
            elif role == "assistant":
                if pending is None:
                    raise ValueError("an assistant turn must follow a user turn")
                pairs.append((pending, self.assistant.format(content=content)))
                pending = None
            else:
                raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        if pending is not None:
            pairs.append((pending, ""))
        elif pairs and self.suffix:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + self.suffix)
        return pairs

    def render(self, messages: Sequence[dict[str, str]], system: str | None = None) -> str:
        return "".join(p + a for p, a in self.render_turns(messages, system))

    # ---------------------------------------------------------------- encoding
    def encode(
        self,
        tokenizer: Any,
        messages: Sequence[dict[str, str]],
        system: str | None = None,
        train_on_prompt: bool = False,
        mask_history: bool = False,
        tokenize: Any = None,
        tokenize_many: Any = None,
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels; each piece is tokenised on its own so the prompt/answer
        boundary is exact (special tokens are single tokens, so no merge crosses it).
        ``tokenize(text, tokenizer)`` replaces plain tokenisation (a plugin's own rule);
        ``tokenize_many(texts, tokenizer)`` does the same for all of a sample's pieces in one
        call (a plugin's :meth:`~mmtune.plugins.BasePlugin.tokenize_many`)."""
        turns = self.render_turns(messages, system)
        if tokenize_many is not None:
            pieces = list(dict.fromkeys(text for turn in turns for text in turn if text))
            done = dict(zip(pieces, tokenize_many(pieces, tokenizer)))

            def tokenize(text: str, tok: Any) -> list[int]:
                return done[text]
        elif tokenize is None:
            def tokenize(text: str, tok: Any) -> list[int]:
                return tok(text, add_special_tokens=False)["input_ids"]

        input_ids: list[int] = []
        labels: list[int] = []
        for i, (prompt, answer) in enumerate(turns):
            p_ids = tokenize(prompt, tokenizer) if prompt else []
            a_ids = tokenize(answer, tokenizer) if answer else []
            trained = not mask_history or i == len(turns) - 1
            input_ids += p_ids + a_ids
            labels += (p_ids if train_on_prompt and trained else [IGNORE_INDEX] * len(p_ids))
            labels += a_ids if trained else [IGNORE_INDEX] * len(a_ids)
        return input_ids, labels


# ---------------------------------------------------------------- generic formats
CHATML = Template(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    stop_words=("<|im_end|>",),
)
VICUNA_V1 = Template(
    name="vicuna_v1",
    prefix="",
    system="{content} ",
    user="USER: {content} ASSISTANT:",
    assistant="{content}</s>",
    default_system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
)
PLAIN = Template(name="plain", system="", user="{content}", assistant="{content}\n")  # LLaVA stage 1: media + caption
LLAMA3 = Template(
    name="llama3",
    prefix="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    stop_words=("<|eot_id|>",),
)
GEMMA = Template(
    name="gemma",
    prefix="<bos>",
    user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
    assistant="{content}<end_of_turn>\n",
    system_in_user=True,
    stop_words=("<end_of_turn>",),
)
MISTRAL = Template(
    name="mistral",
    prefix="<s>",
    user="[INST]{content}[/INST]",
    assistant="{content}</s>",
    system_in_user=True,
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (CHATML, VICUNA_V1, PLAIN, LLAMA3, GEMMA, MISTRAL)}


def register_template(template: Template) -> Template:
    old = TEMPLATES.get(template.name)
    if old is not None and old != template:
        raise ValueError(f"template {template.name!r} is already registered differently")
    TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        from mmtune.families import load_families

        load_families()
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
