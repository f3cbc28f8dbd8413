"""Behaviour of the EmoCAST building blocks, checked against their definitions (docs/model.md §3)."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention

from emocast_core.config import AudioProjectionConfig, FaceLocatorConfig, FaceProjectionConfig, NetConfig
from emocast_core.models.audio_projection import AudioProjection
from emocast_core.models.denoising_unet import AudioAttentionInputs
from emocast_core.models.emotive_audio_attention import EmotiveAudioBlock, EmotiveAudioModule
from emocast_core.models.face_locator import FaceLocator
from emocast_core.models.face_projection import FaceProjection
from emocast_core.models.motion_module import MotionModule, sinusoidal_positions
from emocast_core.models.net import build_net
from emocast_core.models.reference_attention import ReferenceBank, ReferencePairing, ReferenceReader
from emocast_core.models.text_guided_emotive_attention import DecoupledCrossAttnProcessor


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Random values everywhere, so that zero-initialised branches contribute too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _softmax_attention(q, k, v, heads):
    """Reference math, written out: per head softmax(q k^T / sqrt(d)) v."""
    b, lq, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, lq, width)


def test_decoupled_attention_is_the_sum_of_text_and_face_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    proc = DecoupledCrossAttnProcessor(32, 24, face_tokens=4)
    attn.set_processor(proc)
    _randomise(attn)
    x, text, face = torch.randn(2, 10, 32), torch.randn(2, 7, 24), torch.randn(2, 4, 24)
    out = attn(x, encoder_hidden_states=torch.cat([text, face], dim=1))
    q = attn.to_q(x)
    expected = _softmax_attention(q, attn.to_k(text), attn.to_v(text), 4) \
        + _softmax_attention(q, proc.to_k_ip[0](face), proc.to_v_ip[0](face), 4)
    expected = attn.to_out[0](expected)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the face tokens really go through their own projections
    with torch.no_grad():
        proc.to_v_ip[0].weight.zero_()
    only_text = attn.to_out[0](_softmax_attention(q, attn.to_k(text), attn.to_v(text), 4))
    torch.testing.assert_close(attn(x, encoder_hidden_states=torch.cat([text, face], 1)), only_text,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="text tokens followed by 4 face tokens"):
        attn(x, encoder_hidden_states=face)


def _audio_inputs(n=2, size=4, dim=16, token_dim=32):
    torch.manual_seed(1)
    h = torch.randn(n, size * size, dim)
    audio, emotion = torch.randn(n, 6, token_dim), torch.randn(n, 5, token_dim)
    masks = [torch.rand(1, size * size) for _ in range(3)]
    return h, audio, emotion, masks


def test_zero_initialised_fusion_convs_leave_features_unchanged_by_audio():
    block = EmotiveAudioBlock(16, heads=2, token_dim=32, emotion_head_dim=8, zero_init=True)
    h, audio, emotion, masks = _audio_inputs()
    out = block(h, (4, 4), audio, emotion, masks, (1.0, 1.0, 1.0))
    # with the three branches at zero the block is self-attention + feed-forward only
    base = block.attn1(block.norm1(h)) + h
    base = block.ff(block.norm3(base)) + base
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)
    other = block(h, (4, 4), torch.randn_like(audio), torch.randn_like(emotion), masks, (1.0, 1.0, 1.0))
    torch.testing.assert_close(out, other)


def test_masks_gate_their_branches_and_the_bias_survives_masking():
    block = EmotiveAudioBlock(16, heads=2, token_dim=32, emotion_head_dim=8, zero_init=False)
    _randomise(block)
    h, audio, emotion, masks = _audio_inputs()
    w = (0.7, 1.3, 0.4)
    ref = block(h, (4, 4), audio, emotion, masks, w)
    # a branch whose mask is zero and whose conv bias is zero contributes nothing: same as weight 0
    with torch.no_grad():
        block.zero_conv_lip.bias.zero_()
    no_lip_mask = [masks[0], masks[1], torch.zeros_like(masks[2])]
    torch.testing.assert_close(block(h, (4, 4), audio, emotion, no_lip_mask, w),
                               block(h, (4, 4), audio, emotion, masks, (0.7, 1.3, 0.0)), rtol=1e-5, atol=1e-6)
    # tokens outside the face mask do not change when the face branch's audio changes... but with a non-zero
    # bias the masked branch still shifts every token (the mask multiplies before the conv, as released)
    zero = [torch.zeros_like(m) for m in masks]
    a = block(h, (4, 4), audio, emotion, zero, (1.0, 0.0, 0.0))
    b = block(h, (4, 4), audio, emotion, zero, (0.0, 0.0, 0.0))
    assert (a - b).abs().max() > 1e-3
    # with every mask zero the audio has no influence at all
    c = block(h, (4, 4), torch.randn_like(audio), emotion, zero, (1.0, 0.0, 0.0))
    torch.testing.assert_close(a, c)
    assert not torch.allclose(ref, a)


def test_emotion_aware_audio_feature_is_text_attending_to_audio():
    block = EmotiveAudioBlock(16, heads=2, token_dim=32, emotion_head_dim=8, zero_init=False)
    _randomise(block)
    _, audio, emotion, _ = _audio_inputs()
    f = block.emotion_aware_audio(emotion, audio)
    att = block.attn_audioemo
    expected = att.to_out[0](_softmax_attention(att.to_q(emotion), att.to_k(audio), att.to_v(audio), 2))
    torch.testing.assert_close(f, block.postnorm_audioemo(expected), rtol=1e-5, atol=1e-5)
    assert f.shape == emotion.shape  # one emotion-aware audio token per text token


def test_audio_module_uses_its_level_mask():
    module = EmotiveAudioModule(channels=32, inner=16, heads=2, level=1, token_dim=32, emotion_head_dim=8,
                                zero_init=False)
    _randomise(module)
    x = torch.randn(2, 32, 4, 4)
    audio, emotion = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    level0 = torch.rand(1, 64)
    masks = [[level0, torch.rand(1, 16)] for _ in range(3)]
    out = module(x, audio, emotion, masks, (1, 1, 1))
    assert out.shape == x.shape
    changed = [[torch.rand(1, 64), m[1]] for m in masks]  # only level 0 changes: no effect at level 1
    torch.testing.assert_close(module(x, audio, emotion, changed, (1, 1, 1)), out)


def test_motion_module_zero_init_is_identity_and_prefix_is_dropped():
    mm = MotionModule(32, heads=2, max_len=32, zero_init=True)
    x = torch.randn(2 * 4, 32, 3, 3)
    prefix = torch.randn(2, 2, 9, 32)
    torch.testing.assert_close(mm(x, 4, prefix), x)
    _randomise(mm)
    out = mm(x, 4, prefix)
    assert out.shape == x.shape
    other = mm(x, 4, torch.randn_like(prefix))
    assert (out - other).abs().max() > 1e-4  # the motion frames are seen by the clip's frames
    # the position encoding comes from the (loadable) buffer
    pe = mm.temporal_transformer.transformer_blocks[0].attention_blocks[0].pos_encoder.pe
    torch.testing.assert_close(pe, sinusoidal_positions(32, 32))
    with torch.no_grad():
        pe.add_(1.0)
    assert (mm(x, 4, prefix) - out).abs().max() > 1e-4


def test_positions_closed_form():
    pe = sinusoidal_positions(32, 8)
    p, i = 5, 2
    assert pe[0, p, 2 * i].item() == pytest.approx(math.sin(p * math.exp(-2 * i * math.log(10000.0) / 8)))
    assert pe[0, p, 2 * i + 1].item() == pytest.approx(math.cos(p * math.exp(-2 * i * math.log(10000.0) / 8)))


def test_small_modules_shapes_and_errors():
    fl = FaceLocator(FaceLocatorConfig(32, 3, (4, 4, 8, 8)))
    assert fl(torch.rand(1, 3, 64, 64)).abs().max() == 0  # zero-initialised output conv
    _randomise(fl)
    assert fl(torch.rand(1, 3, 64, 64)).shape == (1, 32, 8, 8)
    proj = FaceProjection(FaceProjectionConfig(512, 4, 768))
    tokens = proj(torch.randn(2, 512))
    assert tokens.shape == (2, 4, 768)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)  # LayerNorm per token
    ap = AudioProjection(AudioProjectionConfig(5, 2, 8, 16, 768, 4))
    assert ap(torch.randn(1, 3, 5, 2, 8)).shape == (1, 3, 4, 768)
    with pytest.raises(ValueError, match=r"audio windows must be \(batch, frames, 5, 2, 8\)"):
        ap(torch.randn(1, 3, 5, 12, 768))


@pytest.fixture(scope="module")
def tiny_net():
    net = build_net(NetConfig.tiny(), zero_init=False)
    _randomise(net, seed=3, scale=0.05)
    return net


def _unet_inputs(net, batch=2, frames=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = [size // 2 ** i for i in range(4)]
    masks = [[torch.rand(1, s * s, generator=g) for s in levels] for _ in range(3)]
    cond = AudioAttentionInputs(audio=torch.randn(batch, frames, 4, 768, generator=g),
                                emotion=torch.randn(batch * frames, 77, 768, generator=g), masks=masks)
    return (torch.randn(batch, 4, frames, size, size, generator=g), torch.randn(batch, 81, 768, generator=g), cond,
            torch.randn(batch, 32, size, size, generator=g))


@torch.no_grad()
def test_reference_bank_is_written_once_and_read_by_the_denoising_unet(tiny_net):
    sample, ctx, cond, face = _unet_inputs(tiny_net, batch=1, frames=3)
    ref_latents = torch.randn(3, 4, 16, 16)
    bank = tiny_net.reference_unet(ref_latents, ctx.expand(3, -1, -1))
    paths = ["down_blocks.0.attentions.0", "down_blocks.1.attentions.0", "down_blocks.2.attentions.0",
             "mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
             "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.3.attentions.0",
             "up_blocks.3.attentions.1"]
    assert sorted(bank.features) == sorted(paths)
    assert bank.features["down_blocks.0.attentions.0"].shape == (3, 256, 32)
    assert bank.features["mid_block.attentions.0"].shape == (3, 4, 64)
    with pytest.raises(RuntimeError, match="written once"):
        bank.write("mid_block.attentions.0", bank.features["mid_block.attentions.0"])

    reads = []

    class Spy(ReferenceReader):
        def self_attention(self, path, attn, normed):
            reads.append(path)
            return super().self_attention(path, attn, normed)

    pairing = ReferencePairing.per_sample(batch=1, frames=3, motion_frames=2)
    unet = tiny_net.denoising_unet
    out = unet(sample, 500, ctx, cond, face, Spy(bank, pairing))
    assert reads == [p for p in paths]  # every block reads its own path, once, in execution order
    changed = ReferenceBank({k: torch.randn_like(v) * 3 for k, v in bank.features.items()})
    # same bank: bit-identical; another bank or none: a difference far above float noise (~1e-8 here;
    # the tiny random network is weakly sensitive, hence the small threshold)
    assert torch.equal(unet(sample, 500, ctx, cond, face, ReferenceReader(bank, pairing)), out)
    assert (unet(sample, 500, ctx, cond, face, ReferenceReader(changed, pairing)) - out).abs().max() > 1e-6
    assert (unet(sample, 500, ctx, cond, face, None) - out).abs().max() > 1e-6


def test_official_cfg_pairing():
    p = ReferencePairing.official_cfg(frames=4, motion_frames=2)
    # unconditional half: plain self-attention; conditional frames alternate between the two reference rows
    assert p.reference_rows == (-1, -1, -1, -1, 0, 3, 0, 3)
    assert p.motion_rows == ((1, 2), (4, 5))
    q = ReferencePairing.per_sample(batch=2, frames=2, motion_frames=2)
    assert q.reference_rows == (0, 0, 3, 3) and q.motion_rows == ((1, 2), (4, 5))


@torch.no_grad()
def test_denoising_unet_skips_the_motion_modules_of_attention_free_blocks(tiny_net):
    sample, ctx, cond, face = _unet_inputs(tiny_net)
    ran = []
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: ran.append(name))
               for name, m in tiny_net.denoising_unet.named_modules() if name.endswith(tuple(
                   f"motion_modules.{i}" for i in range(4)))]
    out = tiny_net.denoising_unet(sample, 10, ctx, cond, face)
    for h in handles:
        h.remove()
    assert out.shape == sample.shape
    assert not any(n.startswith(("down_blocks.3.", "up_blocks.0.")) for n in ran)
    assert len(ran) == 10  # of 15 motion modules in the tiny model, as 16 of 21 in the full one


@torch.no_grad()
def test_frames_are_independent_without_motion_modules(tiny_net):
    """Every 2D op is per frame: with the motion modules at identity, frame 0 ignores frame 1's content."""
    unet = tiny_net.denoising_unet
    saved = {}
    for name, p in unet.named_parameters():
        if "motion_modules" in name and "proj_out" in name:
            saved[name] = p.clone()
            p.zero_()
    try:
        sample, ctx, cond, face = _unet_inputs(tiny_net, batch=1)
        a = unet(sample, 10, ctx, cond, face)
        sample2 = sample.clone()
        sample2[:, :, 1] = torch.randn_like(sample2[:, :, 1])
        b = unet(sample2, 10, ctx, cond, face)
        torch.testing.assert_close(a[:, :, 0], b[:, :, 0], rtol=1e-5, atol=1e-6)
        assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-3
    finally:
        for name, p in unet.named_parameters():
            if name in saved:
                p.copy_(saved[name])
