"""The ``base`` family: text-only models, or media kept as plain placeholders."""

from mmtune.plugins import BasePlugin, register_mm_plugin

register_mm_plugin("base", BasePlugin)
