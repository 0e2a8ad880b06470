"""Offline fixtures for tests, benchmarks and the demo: tiny tokenizers, real processors
assembled from them and saved to disk, tiny random model configs, synthetic media.

Each family's :class:`FamilyFixture` lives in ``mmtune.testing.stand_ins.<family>`` (imported
with this package, so ``FIXTURES`` is complete once it is); :func:`processor_dir`
builds it once per process into a temp dir and returns the path, so callers load it
with ``AutoProcessor.from_pretrained(path)`` exactly as they would a hub checkpoint.
"""

from .fixtures import (
    FIXTURES,
    FamilyFixture,
    build_bpe_tokenizer,
    get_fixture,
    load_processor,
    processor_dir,
    register_fixture,
    tiny_model_dir,
)
from .media import make_audio_file, make_image, make_image_file, make_video_file

from . import stand_ins  # noqa: E402,I001 (last: the stand-ins register into FIXTURES)

__all__ = [
    "FIXTURES",
    "FamilyFixture",
    "build_bpe_tokenizer",
    "get_fixture",
    "load_processor",
    "processor_dir",
    "register_fixture",
    "tiny_model_dir",
    "make_audio_file",
    "make_image",
    "make_image_file",
    "make_video_file",
]
