"""GLM-4.6V (model type ``glm46v``): GLM-4.1V's vision tower and grids behind a GLM-4 text model
(transformers' ``Glm46VForConditionalGeneration``, whose ``visual`` is ``glm4v_vision`` and whose
language model is ``glm4v_text``). Images are tokenised as in GLM-4.1V; each video's temporal
group is an image block followed by its timestamp written ``"{t:.1f} seconds"`` (GLM-4.1V writes
an integer) from every second sampled frame's time. Both come from the processor's own
``replace_video_token``, which :class:`~mmtune.families.glm4v.Glm4vPlugin` calls with the grid
and timing it counts, so the plugin is GLM-4.1V's.

Chat templates, from the GLM-4.5V / GLM-4.6V checkpoints' ``chat_template.jinja``: ``[gMASK]<sop>``,
then ``<|system|>\\n...``, ``<|user|>\\n...`` and ``<|assistant|>`` turns with no end marker (a turn
ends where the next role starts); every answer opens with a think block, empty in the history
(``\\n<think></think>\\n`` + answer), the reasoning kept only after the last user turn
(``\\n<think>R</think>\\n`` + answer). ``glm46v`` is the template with ``enable_thinking=False``:
``/nothink`` closes every user turn and the generation prompt ends with ``\\n<think></think>``
(prompt); ``glm46v_thinking`` is the default (thinking) one: the generation prompt ends with
``<|assistant|>`` and the think block is trained with the answer. As in GLM-4.1V, the
conversation is closed with ``<|endoftext|>``, trained, so the model learns to stop (GLM's
fine-tuning recipes do the same). The checkpoints' template skips ``/nothink`` on a user turn
already ending with it; mmtune appends it to every user turn (write prompts without it).

Packing: M-RoPE positions from the model's own ``get_rope_index``, as GLM-4.1V.
"""

from __future__ import annotations

from mmtune.families.glm4v import Glm4vPlugin, glm4v_composite
from mmtune.model.composite import register_composite_model
from mmtune.plugins import register_mm_plugin
from mmtune.templates import Template, register_template

register_mm_plugin("glm46v", Glm4vPlugin)
register_composite_model(glm4v_composite("glm46v", "glm46v"))  # GLM-4.1V's architecture

_GLM = dict(plugin="glm46v", prefix="[gMASK]<sop>", system="<|system|>\n{content}", suffix="<|endoftext|>",
            stop_words=("<|endoftext|>", "<|user|>", "<|observation|>"), split_reasoning=True)
register_template(Template(name="glm46v", user="<|user|>\n{content}/nothink<|assistant|>\n<think></think>",
                           assistant="\n{content}", **_GLM))
register_template(Template(name="glm46v_thinking", user="<|user|>\n{content}<|assistant|>",
                           assistant="\n<think></think>\n{content}",
                           last_assistant="\n<think>{reasoning}</think>\n{content}", **_GLM))
