"""Scheduler settings and initial noise against the test vectors of docs/model.md §5.6."""
from __future__ import annotations

import pytest
import torch

from emocast_core.scheduler import initial_noise, make_scheduler, make_training_scheduler
from parity_fixture import PARITY_TINY, load_expected, load_inputs

OFFICIAL_NOISE_SHAPE = (1, 4, 16, 64, 64)


def test_inference_schedule_test_vectors() -> None:
    scheduler = make_scheduler()
    alphas = scheduler.alphas_cumprod
    assert alphas.dtype == torch.float32
    for index, value in [(0, 0.99914998), (24, 0.97472489), (499, 0.14252949), (974, 4.4343244e-05),
                         (998, 6.2773672e-08)]:
        assert alphas[index].item() == pytest.approx(value, rel=1e-6), index
    assert alphas[999].item() == 0.0  # zero terminal SNR
    assert scheduler.betas[0].item() == pytest.approx(0.00085002, rel=1e-5)
    assert scheduler.betas[999].item() == 1.0
    assert scheduler.final_alpha_cumprod.item() == 1.0
    assert scheduler.init_noise_sigma == 1.0
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.clip_sample is False and scheduler.config.thresholding is False


def test_forty_trailing_timesteps() -> None:
    scheduler = make_scheduler()
    scheduler.set_timesteps(40)
    assert scheduler.timesteps.tolist() == list(range(999, 0, -25))
    assert scheduler.timesteps[-1].item() == 24 and len(scheduler.timesteps) == 40


def test_parity_fixture_timesteps_and_initial_latents() -> None:
    inputs, expected = load_inputs(PARITY_TINY), load_expected(PARITY_TINY)
    scheduler = make_scheduler()
    scheduler.set_timesteps(inputs["steps"])
    assert scheduler.timesteps.tolist() == expected["timesteps"].tolist()

    # The fixture is an fp32 run: its first UNet input ([uncond, cond] copies of the latents) is the
    # seed's fp32 draw, which is why the draw precision follows the run dtype by default.
    sample_in = expected["intermediates"]["denoising_unet"][0]["sample_in"]
    size = inputs["height"] // 8
    shape = (1, 4, inputs["n_sample_frames"], size, size)
    latents = initial_noise(torch.Generator().manual_seed(inputs["seed"]), shape, torch.float32)
    assert torch.equal(sample_in[:1], latents) and torch.equal(sample_in[1:], latents)


def test_training_scheduler_uses_scaled_linear_betas() -> None:
    scheduler = make_training_scheduler()
    alphas = scheduler.alphas_cumprod
    for index, value in [(24, 0.97598231), (499, 0.24235900), (974, 1.3708424e-04)]:
        assert alphas[index].item() == pytest.approx(value, rel=1e-6), index
    assert alphas[999].item() == 0.0 and scheduler.config.prediction_type == "v_prediction"


def test_overrides_and_unknown_settings() -> None:
    assert make_scheduler(timestep_spacing="leading").config.timestep_spacing == "leading"
    with pytest.raises(ValueError, match="unknown DDIMScheduler setting.*'beta_strat'"):
        make_scheduler(beta_strat=0.1)


def test_ddim_v_step_matches_closed_form() -> None:
    scheduler = make_scheduler()
    scheduler.set_timesteps(40)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 2, 8, 8, generator=generator)
    v = torch.randn(1, 4, 2, 8, 8, generator=generator)

    # t = 999: alpha_cumprod is exactly 0, so x0 = -v and eps = x_t.
    out = scheduler.step(v, 999, x_t, eta=0.0)
    assert torch.equal(out.pred_original_sample, -v)
    a_prev = scheduler.alphas_cumprod[974]
    expected = a_prev.sqrt() * -v + (1 - a_prev).sqrt() * x_t
    assert torch.allclose(out.prev_sample, expected, atol=1e-6, rtol=0)

    # a middle step, general formula
    a, a_prev = scheduler.alphas_cumprod[499], scheduler.alphas_cumprod[474]
    x0 = a.sqrt() * x_t - (1 - a).sqrt() * v
    eps = a.sqrt() * v + (1 - a).sqrt() * x_t
    out = scheduler.step(v, 499, x_t, eta=0.0)
    assert torch.allclose(out.prev_sample, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, atol=1e-5, rtol=0)

    # the last step (t = 24) returns x0, because the final alpha is 1
    out = scheduler.step(v, 24, x_t, eta=0.0)
    assert torch.equal(out.prev_sample, out.pred_original_sample)

    # fp16 latents stay fp16 (0-d fp32 scalars do not promote)
    assert scheduler.step(v.half(), 999, x_t.half(), eta=0.0).prev_sample.dtype == torch.float16


def test_official_fp16_noise_test_vector() -> None:
    generator = torch.Generator().manual_seed(42)
    first = initial_noise(generator, OFFICIAL_NOISE_SHAPE, torch.float16)
    second = initial_noise(generator, OFFICIAL_NOISE_SHAPE, torch.float16)
    assert first.shape == OFFICIAL_NOISE_SHAPE and first.dtype == torch.float16
    expected_first = torch.tensor([0.38696, 1.4707, 0.14685, -1.1182], dtype=torch.float16)
    expected_second = torch.tensor([-0.034210, -0.22791, -0.15820, -1.2178], dtype=torch.float16)
    assert torch.equal(first.flatten()[:4], expected_first)
    assert torch.equal(second.flatten()[:4], expected_second)
    # a standard normal overall
    assert abs(first.float().mean().item()) < 0.01 and abs(first.float().std().item() - 1) < 0.01

    # the same fp16 numbers in an fp32 run when asked for; and drawing all clips at once is the same stream
    generator = torch.Generator().manual_seed(42)
    both = initial_noise(generator, (2, *OFFICIAL_NOISE_SHAPE[1:]), torch.float32, draw_dtype=torch.float16)
    assert both.dtype == torch.float32 and torch.equal(both, torch.cat([first, second]).float())


def test_fp16_noise_tail_and_fp32_noise() -> None:
    # 40 values = 2 blocks of 16 + the last 16 recomputed from 16 more draws
    generator = torch.Generator().manual_seed(7)
    odd = initial_noise(generator, (40,), torch.float16)
    after = torch.randint(0, 2, (1,), generator=generator)
    generator = torch.Generator().manual_seed(7)
    torch.randint(0, 2048, (56,), generator=generator)  # the generator advanced by 40 + 16 draws
    assert after.item() == torch.randint(0, 2, (1,), generator=generator).item()
    assert torch.equal(odd[:24], initial_noise(torch.Generator().manual_seed(7), (32,), torch.float16)[:24])

    # fp32 runs draw fp32 directly (what the fp32 parity fixture's first latents are)
    generator = torch.Generator().manual_seed(42)
    assert torch.equal(initial_noise(generator, (2, 3, 16), torch.float32),
                       torch.randn((2, 3, 16), generator=torch.Generator().manual_seed(42)))


def test_noise_argument_errors() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        initial_noise(torch.Generator().manual_seed(0), (2, 3), torch.float16)
    with pytest.raises(ValueError, match="positive sizes"):
        initial_noise(torch.Generator().manual_seed(0), (0, 4), torch.float32)
    with pytest.raises(TypeError, match="torch.Generator"):
        initial_noise(42, (16,), torch.float16)  # type: ignore[arg-type]
