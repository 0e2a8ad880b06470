"""Offline fixtures for tests, benchmarks and the demo: tiny tokenizers, real processors
assembled from them and saved to disk, tiny random model configs, synthetic media.

Each family registers a :class:`FamilyFixture` in its own file; :func:`processor_dir`
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
