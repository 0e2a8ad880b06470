"""mmtune: exact, fast fine-tuning of multimodal language models."""

from mmtune.versions import check_transformers as _check_transformers

__version__ = "0.1.0"

_check_transformers()  # one warning when the installed transformers is outside the tested range

# Last: the families fill the plugin, template and composite-model registries (they import those
# lower modules, never this one's names), so every table is complete once ``mmtune`` is imported.
import mmtune.families  # noqa: E402,F401
