"""The native LLaVA model: splicing, loss, mixed batches, padding, generation, round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmtune.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .conftest import make_model

IMG = IMAGE_TOKEN_INDEX


def plain_llama(model):
    """A plain LlamaForCausalLM with the LLaVA model's language weights."""
    cfg = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k in LlamaConfig().to_dict()})
    cfg._attn_implementation = "eager"
    llama = LlamaForCausalLM(cfg).eval()
    state = {k: v for k, v in model.state_dict().items() if "vision_tower" not in k and "mm_projector" not in k}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    return llama


def hand_embeds(model, ids, images):
    """tower -> projector -> spliced at the placeholders, by hand."""
    feats = model.get_model().mm_projector(model.get_vision_tower()(images))
    pieces, k = [], 0
    emb = model.get_model().embed_tokens
    start = 0
    for i, t in enumerate(ids):
        if t == IMG:
            pieces += [emb(torch.tensor(ids[start:i], dtype=torch.long)), feats[k]]
            k += 1
            start = i + 1
    pieces.append(emb(torch.tensor(ids[start:], dtype=torch.long)))
    return torch.cat(pieces)


def test_logits_equal_plain_llama_on_hand_built_embeddings(tiny, images):
    ids = [1, 20, IMG, 30, 31, IMG, 40, 41, 42]
    labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 31, IGNORE_INDEX, 40, 41, 42]
    with torch.no_grad():
        out = tiny(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), images=images[:2])
        embeds = hand_embeds(tiny, ids, images[:2])
        ref = plain_llama(tiny)(inputs_embeds=embeds[None])
    n = tiny.get_vision_tower().num_tokens
    assert out.logits.shape[1] == len(ids) - 2 + 2 * n
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    # loss only on the text labels (image features and IGNORE_INDEX never count)
    full = []
    for t, y in zip(ids, labels):
        full += [IGNORE_INDEX] * n if t == IMG else [y]
    full = torch.tensor(full)
    ce = torch.nn.functional.cross_entropy(ref.logits[0, :-1], full[1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ce, atol=1e-6, rtol=0)
    assert (full[1:] != IGNORE_INDEX).sum() == 4


SAMPLES = [
    ([1, 20, 21, 22, 23], 0),  # text only
    ([1, 20, IMG, 24, 25, 26], 1),
    ([1, IMG, 27, IMG, 28, IMG, 29], 3),
]


def _batch(samples, side, pad_id=0):
    length = max(len(s) for s, _ in samples)
    ids, mask = [], []
    for s, _ in samples:
        pad = [pad_id] * (length - len(s))
        ids.append(pad + s if side == "left" else s + pad)
        m = [0] * (length - len(s))
        mask.append(m + [1] * len(s) if side == "left" else [1] * len(s) + m)
    return torch.tensor(ids), torch.tensor(mask)


@pytest.mark.parametrize("input_side", ["left", "right"])
@pytest.mark.parametrize("output_side", ["left", "right"])
def test_mixed_batch_equals_each_sample_alone(tiny, images, input_side, output_side):
    tiny.config.tokenizer_padding_side = output_side
    ids, mask = _batch(SAMPLES, input_side)
    labels = ids.masked_fill(ids < 2, IGNORE_INDEX)
    with torch.no_grad():
        batch = tiny(input_ids=ids, attention_mask=mask, images=images, labels=labels)
        used = 0
        for b, (sample, n_img) in enumerate(SAMPLES):
            alone = tiny(input_ids=torch.tensor([sample]), images=images[used:used + n_img] if n_img else None)
            used += n_img
            length = alone.logits.shape[1]
            got = batch.logits[b, -length:] if output_side == "left" else batch.logits[b, :length]
            torch.testing.assert_close(got, alone.logits[0], atol=1e-5, rtol=0)


def test_images_as_list_of_tensors_equal_one_tensor(tiny, images):
    ids, mask = _batch(SAMPLES, "right")
    with torch.no_grad():
        a = tiny(input_ids=ids, attention_mask=mask, images=images).logits
        b = tiny(input_ids=ids, attention_mask=mask, images=[images[i] for i in range(4)]).logits
    torch.testing.assert_close(a, b)


def test_truncation_to_tokenizer_model_max_length(tiny, images):
    tiny.config.tokenizer_model_max_length = 20
    ids = torch.tensor([[1, 20, IMG, 30, 31, 32]])
    with torch.no_grad():
        cut = tiny(input_ids=ids, images=images[:1], labels=ids.clamp(min=0))
        tiny.config.tokenizer_model_max_length = None
        full = tiny(input_ids=ids, images=images[:1])
    assert cut.logits.shape[1] == 20
    torch.testing.assert_close(cut.logits[0], full.logits[0, :20], atol=1e-5, rtol=0)


def test_placeholder_count_mismatch_is_a_clear_error(tiny, images):
    with pytest.raises(ValueError, match="2 <image> placeholders .* but 1 images"):
        tiny(input_ids=torch.tensor([[1, IMG, 5, IMG]]), images=images[:1])
    with pytest.raises(ValueError, match="no <image> placeholder"):
        tiny(input_ids=torch.tensor([[1, 5, 6]]), images=images[:1])


def test_im_start_end_wraps_the_features(images):
    model = make_model(mm_use_im_start_end=True)
    # the tokens come from the text; the model only splices between them
    ids = torch.tensor([[1, 20, 50, IMG, 51, 30]])
    with torch.no_grad():
        out = model(input_ids=ids, images=images[:1])
    assert out.logits.shape[1] == 5 + model.get_vision_tower().num_tokens


def _greedy_without_cache(model, ids, images, steps):
    ids = list(ids)
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), images=images, use_cache=False).logits
        token = int(logits[0, -1].argmax())
        ids.append(token)
        new.append(token)
    return new


def test_greedy_generation_with_cache_equals_without(tiny, images):
    ids = [1, 20, IMG, 30, 31]
    calls = []
    tower = tiny.get_vision_tower()
    hook = tower.register_forward_hook(lambda *a: calls.append(1))
    out = tiny.generate(torch.tensor([ids]), images=images[:1], max_new_tokens=8, do_sample=False,
                        min_new_tokens=8, pad_token_id=0)
    hook.remove()
    assert calls == [1], "images must be encoded once, not at every decoding step"
    assert out.shape == (1, 8)
    assert out[0].tolist() == _greedy_without_cache(tiny, ids, images[:1], 8)


def test_batched_generation_left_pads_and_matches_single(tiny, images):
    samples = [[1, 20, IMG, 30, 31], [1, IMG, 33]]
    ids, mask = _batch([(s, 0) for s in samples], "right")
    out = tiny.generate(ids, attention_mask=mask, images=images[:2], max_new_tokens=5, do_sample=False,
                        min_new_tokens=5, pad_token_id=0)
    for b, sample in enumerate(samples):
        single = tiny.generate(torch.tensor([sample]), images=images[b:b + 1], max_new_tokens=5, do_sample=False,
                               min_new_tokens=5, pad_token_id=0)
        assert out[b].tolist() == single[0].tolist()


def test_save_and_auto_from_pretrained_round_trip(tiny, images, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "llava_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded).__name__ == "LlavaLlamaForCausalLM"
    ids = torch.tensor([[1, 20, IMG, 30, 31]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, images=images[:1]).logits,
                                   tiny(input_ids=ids, images=images[:1]).logits, atol=0, rtol=0)


def test_training_step_lowers_the_loss(images):
    model = make_model().train()
    model.get_vision_tower().requires_grad_(False)
    tower_before = {k: v.clone() for k, v in model.get_vision_tower().state_dict().items()}
    projector_before = model.get_model().mm_projector[0].weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.tensor([[1, 20, IMG, 30, 31, 32, 33], [1, IMG, 34, 35, 36, 37, 38]])
    labels = ids.masked_fill(ids < 30, IGNORE_INDEX)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels, images=images[:2]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model.get_model().mm_projector[0].weight, projector_before)
    for k, v in model.get_vision_tower().state_dict().items():
        assert torch.equal(v, tower_before[k]), k
