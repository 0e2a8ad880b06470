"""A chat template is a few format strings; encoding gives ``input_ids`` and ``labels`` with
loss on assistant turns only (or on every turn with ``train_on_prompt``; on the last turn
only with ``mask_history``).

Families register their template in their own file (``register_template``) by naming a
generic format below plus their plugin; a lookup that misses loads the families once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmtune.constants import IGNORE_INDEX
from mmtune.errors import DataError, UserError

#: the roles a normalised conversation holds
ROLES = ("system", "user", "assistant")
#: what a user or assistant turn at the wrong place should become, by role
_FIX_SAME_ROLE = {
    "user": "merge them into one turn, or put the assistant's answer between them",
    "assistant": "merge them into one answer, or put the user's turn between them",
}
#: the special-token markers of a format string (``<|im_start|>``, ``<start_of_turn>``, ``</s>``);
#: bracketed ones (``[INST]``) are left out: older Mistral tokenizers spell them as plain text
_MARKER = re.compile(r"<\|[^|<>\s]+\|>|</?[A-Za-z_]\w*>")


def tokenizer_name(tokenizer: Any) -> str:
    """The tokenizer's class and the folder it was loaded from, for error messages."""
    source = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__} of {source}" if source else type(tokenizer).__name__


class TemplateFitError(UserError, ValueError):
    """A chat template (or its plugin) that does not fit the model's tokenizer or processor:
    training on it would feed the model text it has no tokens for."""


def conversation_problem(roles: Sequence[str], positions: Sequence[int] | None = None) -> str | None:
    """What is wrong with a conversation of these roles, or None when nothing is.

    A conversation is an optional system turn first, then user and assistant turns taking
    turns, starting with the user. Anything else has no single right rendering: a chat
    template would have to drop, merge or reorder turns, so it is refused rather than
    guessed. ``positions`` are the turns' 1-based numbers as the user's data counts them
    (default: their order here). A last user turn is allowed (a generation prompt)."""
    number = (lambda i: positions[i]) if positions is not None else (lambda i: i + 1)
    previous: int | None = None  # index of the last user/assistant turn
    for i, role in enumerate(roles):
        if role not in ROLES:
            return f"turn {number(i)} has the role {role!r}; expected system, user or assistant"
        if role == "system":
            if previous is not None or i > 0:
                return (f"turn {number(i)} is a system turn after the conversation started: a system prompt must be "
                        "the first turn (or in the row's system column); move it to the front or drop it")
            continue
        if previous is None:
            if role == "assistant":
                return (f"the conversation starts with an assistant turn (turn {number(i)}): an assistant turn must "
                        "follow a user turn; add the user's prompt before it")
        elif roles[previous] == role:
            who = "the user" if role == "user" else "the assistant"
            return f"turns {number(previous)} and {number(i)} are both from {who}: {_FIX_SAME_ROLE[role]}"
        previous = i
    if previous is None:
        return "the conversation has no user turn: it needs a user's prompt and the assistant's answer"
    return None


@dataclass(frozen=True)
class Template:
    """``{content}`` is the message text. ``prefix`` opens every conversation (e.g. BOS);
    ``system`` renders the system prompt (``default_system`` when the sample has none);
    ``user`` renders a user turn including the assistant's opening (the generation prompt);
    ``assistant`` renders the answer including its end-of-turn marker, which is trained;
    ``suffix`` closes a conversation that ends with an answer (trained with that answer).

    Reasoning models render the last exchange otherwise than the history: ``last_user`` (when
    set) renders the final user turn and its assistant opening (Qwen3.5: the ``<think>`` block
    opens there), and with ``split_reasoning`` an answer written as ``<think>R</think>A`` (or
    ``R</think>A``) keeps its reasoning R only in the last answer, formatted by
    ``last_assistant``'s ``{reasoning}`` and ``{content}``; earlier answers keep A alone, as
    the checkpoints' own templates drop the reasoning of past turns. ``generation_tail`` ends
    a generation prompt only (a conversation that ends with a user turn): text the model's own
    template puts there which training keeps in the answer, so that no token merges across the
    prompt/answer boundary (Qwen3.5's ``<think>`` + ``\n`` + reasoning)."""

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
    #: the final user turn (with the assistant's opening); None: ``user``
    last_user: str | None = None
    #: the final answer, ``{reasoning}`` and ``{content}``; None: ``assistant``
    last_assistant: str | None = None
    #: answers carry ``<think>`` reasoning: split it off (kept only in the final answer)
    split_reasoning: bool = False
    #: appended to a generation prompt (not to a prompt that has its answer)
    generation_tail: str = ""

    def bind(self, name: str, plugin: str, **changes: Any) -> Template:
        return dataclasses.replace(self, name=name, plugin=plugin, **changes)

    # ---------------------------------------------------------------- fit
    def turn_markers(self) -> list[str]:
        """The special-token markers of the turn formats (user, assistant, suffix) and the stop
        words: a model trained with this template must have each as one token, or it learns
        their pieces as text and never stops where the template ends a turn. The prefix (a
        BOS some tokenizers name otherwise) and the system format (used only by samples with
        a system prompt; older tokenizers of a family lack its marker) are left out."""
        texts = [self.user, self.assistant, self.suffix, self.last_user or "", self.last_assistant or "",
                 *self.stop_words]
        texts = [t.replace("{content}", " ").replace("{reasoning}", " ") for t in texts]
        return list(dict.fromkeys(m for text in texts for m in _MARKER.findall(text)))

    def missing_markers(self, tokenizer: Any) -> list[str]:
        """The :meth:`turn_markers` that ``tokenizer`` does not keep as one known token."""
        markers = self.turn_markers()
        if not markers:
            return []
        unk = getattr(tokenizer, "unk_token_id", None)
        batch = tokenizer(markers, add_special_tokens=False)["input_ids"]
        return [m for m, ids in zip(markers, batch) if len(ids) != 1 or ids[0] == unk]

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise :class:`TemplateFitError` when :meth:`missing_markers` finds any: the message
        names the template, the tokenizer and the missing tokens."""
        missing = self.missing_markers(tokenizer)
        if missing:
            raise TemplateFitError(
                f"template {self.name!r} does not fit the model's tokenizer ({tokenizer_name(tokenizer)}): it has no "
                f"{', '.join(missing)} token{'s' if len(missing) > 1 else ''}; leave `template` unset to use the one "
                "the model's family declares, or name the model's own template")

    # ---------------------------------------------------------------- rendering
    def render_turns(self, messages: Sequence[dict[str, str]], system: str | None = None) -> list[tuple[str, str]]:
        """(prompt text, answer text) per user/assistant pair, the first prompt carrying the
        prefix and system prompt. A trailing user turn gets an empty answer (the generation
        prompt). A conversation that is not an optional system turn then alternating user and
        assistant turns raises :class:`~mmtune.errors.DataError` (see
        :func:`conversation_problem`): no turn is ever dropped or reordered to fit."""
        problem = conversation_problem([m["role"] for m in messages])
        if problem:
            raise DataError(problem)
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
                user = self.last_user if self.last_user is not None and i == last_user else self.user
                pending = head + user.format(content=content)
            else:  # an assistant turn, after a user turn (checked above)
                pairs.append((pending, self.format_answer(content, last=i > last_user)))
                pending = None
        if pending is not None:
            pairs.append((pending + self.generation_tail, ""))
        elif pairs and self.suffix:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + self.suffix)
        return pairs

    def format_answer(self, content: str, last: bool) -> str:
        """One assistant turn's text; ``last``: it follows the final user turn."""
        reasoning = ""
        if self.split_reasoning:
            content, reasoning = split_think(content)
        if last and self.last_assistant is not None:
            return self.last_assistant.format(content=content, reasoning=reasoning)
        if last and reasoning:
            raise DataError(f"the last answer has reasoning (a </think> block), which template {self.name!r} does not "
                            f"train: use {self.name}_thinking, or drop the reasoning from the data")
        return self.assistant.format(content=content)

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


def split_think(text: str) -> tuple[str, str]:
    """(answer, reasoning) of an answer written as ``<think>R</think>A`` or ``R</think>A``, as
    Qwen3's and Qwen3.5's chat templates split it: both stripped of surrounding whitespace,
    the answer of leading newlines; an answer with no ``</think>`` has no reasoning."""
    text = text.strip()
    if "</think>" not in text:
        return text, ""
    reasoning = text.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return text.split("</think>")[-1].lstrip("\n"), reasoning.strip()


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
        raise ValueError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
