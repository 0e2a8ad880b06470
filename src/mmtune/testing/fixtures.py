"""Fixture registry and the shared tiny-tokenizer builder (the fixtures themselves are in
``mmtune.testing.stand_ins``)."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CORPUS: tuple[str, ...] = (
    "A red circle sits next to a blue square on a white background.",
    "What colour is the shape? The shape is green. What shape is it? It is a triangle.",
    "Describe the image in detail. The picture shows a small yellow star and a purple cross.",
    "You are a helpful assistant. Answer the question about the video and the audio clip.",
    "user assistant system the a an of in on with and or is are was were be this that these",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 ! ? . , : ; ' \" ( ) [ ] { } < > / \\ - _ + = * & % $ # @",
    "Hello world! How are you today? I am fine, thank you. Please tell me more about it.",
    "orange cyan magenta black gray brown pink circle square triangle star cross hexagon",
)


def build_bpe_tokenizer(
    special_tokens: Sequence[str] = (),
    vocab_size: int = 400,
    corpus: Sequence[str] = CORPUS,
    byte_level: bool = True,
) -> Any:
    """A small byte-level BPE (``tokenizers.Tokenizer``) with ``special_tokens`` added as
    special, single-id tokens. Wrap it in a family's tokenizer class with
    ``SomeTokenizerFast(tokenizer_object=tok, ...)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(special_tokens)),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return tok


@dataclass
class FamilyFixture:
    """How to build one family's tiny processor and model config offline.

    ``build(path)`` must write a complete processor (tokenizer + image/video/audio
    processors) to ``path`` with ``save_pretrained`` so that
    ``AutoProcessor.from_pretrained(path)`` loads it. ``tiny_config()`` returns a
    randomly-initialisable transformers config (tiny sizes) for the family's model, or
    ``None`` if the family has no model class in transformers.
    """

    name: str
    build: Callable[[str], None]
    tiny_config: Callable[[], Any] | None = None
    plugin: str | None = None
    modalities: tuple[str, ...] = ("image",)
    extra: dict[str, Any] = field(default_factory=dict)


FIXTURES: dict[str, FamilyFixture] = {}


def register_fixture(fixture: FamilyFixture) -> FamilyFixture:
    FIXTURES[fixture.name] = fixture
    return fixture


def get_fixture(name: str) -> FamilyFixture:
    if name not in FIXTURES:
        raise KeyError(f"no test fixture named {name!r}; known: {', '.join(sorted(FIXTURES))}")
    return FIXTURES[name]


_ROOT = None


def _root() -> str:
    global _ROOT
    if _ROOT is None:
        _ROOT = tempfile.mkdtemp(prefix="mmtune-fixtures-")
    return _ROOT


@functools.cache
def processor_dir(name: str, root: str | None = None) -> str:
    """Build fixture ``name`` once (per process and root) and return its directory."""
    path = os.path.join(root or _root(), name)
    os.makedirs(path, exist_ok=True)
    get_fixture(name).build(path)
    return path


def load_processor(name: str, **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained`` on the fixture's saved directory (real loading)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(processor_dir(name), **kwargs)


def tiny_model_dir(name: str, root: str, seed: int = 0) -> str:
    """A randomly initialised tiny model of fixture ``name`` saved with its processor, like a
    downloaded checkpoint, so the real loading path (``from_pretrained``) is exercised."""
    import torch
    from transformers import AutoProcessor

    from mmtune.model.loader import model_class_for

    fixture = get_fixture(name)
    if fixture.tiny_config is None:
        raise ValueError(f"fixture {name!r} has no tiny model config")
    path = os.path.join(root, f"tiny-{name}")
    config = fixture.tiny_config()
    torch.manual_seed(seed)
    cls = model_class_for(config)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model.save_pretrained(path)
    AutoProcessor.from_pretrained(processor_dir(name)).save_pretrained(path)
    return path
