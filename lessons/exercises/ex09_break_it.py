"""Break it: predict what goes wrong, then look. Check your answers with:  python -m minildm.check 09

Lesson 09 (lessons/09_break_it.md) and its notebook break a working diffusion model five ways. The
lesson asks these five questions before it shows what the experiments measured: answer each below
before you run the notebook or read the lesson's "What happened", with a number you can work out on
paper or with minildm (e.g. `NoiseSchedule.sd().alphas_cumprod[500]`), or a letter. The checker says
right or wrong and does not print the answers. Leave a value as None until you have answered.
"""

# 1. No guidance. Classifier-free guidance combines two predictions at every step:
#    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond).
#    At one latent element the UNet predicts eps_uncond = 0.2 and eps_cond = 0.5.
#    What eps does the sampler use with guidance_scale = 7.5?
GUIDED_EPS = None
#    In the notebook's guidance figure, the samples with guidance_scale = 1 ("no guidance")
#    (a) collapse onto a thin arc, tighter than with guidance 3,
#    (b) form a broad band around the upper moon with a few points off it, and are the closest of
#        all four panels to the upper moon's data in distribution,
#    (c) cover both moons evenly, like guidance 0,
#    (d) are pure noise.
#    Answer with a letter, e.g. "c".
NO_GUIDANCE_CHOICE = None

# 2. Wrong latent scale factor. SD v1 multiplies VAE latents by 0.18215 so that they have unit
#    variance. A model trained WITHOUT the factor sees latents about 1/0.18215 times larger. By what
#    factor is the signal-to-noise ratio of z_t = sqrt(abar) z0 + sqrt(1 - abar) eps then larger
#    than the schedule intends, at every t?
SNR_RATIO_UNSCALED = None

# 3. Wrong beta schedule. How much of the signal variance, abar_t, is left at t = 500 under DDPM's
#    linear schedule (NoiseSchedule.linear()) and under SD's scaled_linear (NoiseSchedule.sd())?
ABAR_500_LINEAR = None
ABAR_500_SCALED = None

# 4. eps vs v. A model trained to predict v = sqrt(abar) eps - sqrt(1 - abar) x0 is sampled by code
#    that believes it predicts eps, so it computes x0_pred = (z_t - sqrt(1 - abar) v) / sqrt(abar).
#    Write z_t = sqrt(abar) x0 + sqrt(1 - abar) eps and expand: at abar = 0.5, x0_pred is
#    k * x0 + (something) * eps. What is k?
X0_GAIN_V_AS_EPS = None

# 5. No EMA. An exponential moving average with decay 0.999 updates
#    ema <- 0.999 * ema + 0.001 * weights after every optimiser step, starting from the initial
#    (random) weights. After 100 steps, what fraction of the EMA is still the initial weights?
EMA_INIT_SHARE = None
