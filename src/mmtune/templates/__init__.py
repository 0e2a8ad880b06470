"""Chat templates: the rendered text of a conversation, and which tokens carry loss."""

from .template import (
    IGNORE_INDEX,
    TEMPLATES,
    Template,
    TemplateFitError,
    conversation_problem,
    get_template,
    register_template,
)

__all__ = ["IGNORE_INDEX", "TEMPLATES", "Template", "TemplateFitError", "conversation_problem", "get_template",
           "register_template"]
