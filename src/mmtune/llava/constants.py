"""Token constants of the LLaVA codebase (kept numerically identical for checkpoint and data compatibility)."""

from mmtune.constants import IGNORE_INDEX  # noqa: F401  (re-exported, LLaVA's name)
#: the id an ``<image>`` placeholder takes in ``input_ids``; replaced by the image's features in forward
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
