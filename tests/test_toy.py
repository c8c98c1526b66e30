"""Tests for minildm.toy: the 2-D data, the MLP denoiser, its training, and samples from the real samplers."""
import json

import pytest
import torch

from minildm.samplers import SAMPLERS
from minildm.toy import (
    ToyConfig, ToyDenoiser, make_data, nearest_distance, sample_toy, sliced_wasserstein, timestep_embedding,
    train_toy,
)

# Measured: the trained toy's samples sit at a sliced Wasserstein distance of 0.02-0.05 from fresh data
# (two draws of the data: 0.02-0.05) and 0.010-0.019 from the nearest data point (data: 0.004);
# samplers with a realistic bug, or that stop after one step, land above 0.2 on both.
GOOD_SW = 0.1
GOOD_NEAR = 0.04


@pytest.fixture(scope="session")
def trained_toy():
    """A toy model trained once for the whole session (a few seconds on one thread)."""
    model, schedule, losses = train_toy("moons", seed=0)
    return model, schedule, losses


def distance_to_data(points):
    data = make_data("moons", points.shape[0], torch.Generator().manual_seed(123))
    return sliced_wasserstein(points, data, generator=torch.Generator().manual_seed(0))


def distance_to_nearest(points):
    return nearest_distance(points, make_data("moons", 20000, torch.Generator().manual_seed(124)))


def test_data_sets_are_seeded_and_centred():
    """Each data set is reproducible from its generator and roughly centred on the origin."""
    for name in ("moons", "spiral"):
        a = make_data(name, 5000, torch.Generator().manual_seed(1))
        b = make_data(name, 5000, torch.Generator().manual_seed(1))
        assert a.shape == (5000, 2) and torch.equal(a, b)
        assert a.mean(0).abs().max() < 0.5 and a.abs().max() < 2.5
    with pytest.raises(ValueError):
        make_data("nope", 10)


def test_denoiser_shapes_and_config_round_trip():
    """The denoiser maps (N, 2) points and (N,) fractional timesteps to (N, 2); its config survives JSON."""
    cfg = ToyConfig.tiny()
    model = ToyDenoiser(cfg)
    out = model(torch.randn(7, 2), torch.tensor([0.0, 1.5, 10, 100, 500, 998.7, 999]))
    assert out.shape == (7, 2)
    assert ToyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    emb = timestep_embedding(torch.tensor([0.0, 999.0]), 16)
    assert emb.shape == (2, 16) and torch.equal(emb[0, :8], torch.ones(8))


def test_training_is_deterministic_and_leaves_global_rng_alone():
    """Two short runs with one seed give identical weights, and the global random state is untouched."""
    state = torch.get_rng_state()
    runs = [train_toy("spiral", num_steps=20, batch_size=64, cfg=ToyConfig.tiny(), seed=3) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(p, q)
    assert runs[0][2] == runs[1][2]


def test_training_reduces_the_loss(trained_toy):
    """The noise-prediction loss falls well below its starting value."""
    _, _, losses = trained_toy
    first, last = sum(losses[:20]) / 20, sum(losses[-100:]) / 100
    assert last < 0.75 * first, f"loss went from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize("name,num_steps", [
    ("ddpm", 100), ("ddim", 50), ("plms", 20), ("euler", 30), ("euler_a", 30), ("heun", 15), ("lms", 20), ("dpmpp_2m", 20),
])
def test_trained_toy_samples_match_the_data(trained_toy, name, num_steps):
    """Every sampler draws points from the trained toy whose distribution is close to the data's."""
    model, schedule, _ = trained_toy
    points = sample_toy(model, schedule, name, num_steps, n=2000, generator=torch.Generator().manual_seed(1))
    distance, near = distance_to_data(points), distance_to_nearest(points)
    assert distance < GOOD_SW, f"{name}: sliced Wasserstein {distance:.4f} (threshold {GOOD_SW})"
    assert near < GOOD_NEAR, f"{name}: mean distance to the nearest data point {near:.4f} (threshold {GOOD_NEAR})"


def test_broken_samplers_fail_the_same_statistic(trained_toy):
    """The statistics catch a sampler that feeds the model the unscaled x, one that stops after one step,
    and one that returns its input noise."""
    model, schedule, _ = trained_toy

    def unscaled(z_t, t):  # the classic k-diffusion bug: forgetting x = z_t * sqrt(1 + sigma^2)
        return model(z_t * (1 + schedule.t_to_sigma(t) ** 2).sqrt()[:, None], t)

    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    one_step = sample_toy(model, schedule, "ddim", 1, n=2000, generator=torch.Generator().manual_seed(1))
    for label, points in [("unscaled", SAMPLERS["euler"](unscaled, z, schedule, 30)), ("one step", one_step),
                          ("noise", z)]:
        distance, near = distance_to_data(points), distance_to_nearest(points)
        assert distance > 2 * GOOD_SW and near > 2 * GOOD_NEAR, f"{label}: {distance:.4f}, {near:.4f}"


def test_trajectory_shape(trained_toy):
    """sample_toy can return the path of every point, from the start noise to the final sample."""
    model, schedule, _ = trained_toy
    out, path = sample_toy(model, schedule, "euler", 10, n=50, generator=torch.Generator().manual_seed(0),
                           return_trajectory=True)
    assert path.shape == (11, 50, 2) and torch.equal(path[-1], out)


def test_sliced_wasserstein_properties():
    """The distance is zero for identical clouds and grows with a shift."""
    a = torch.randn(500, 2)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert sliced_wasserstein(a, a, generator=g()) == 0
    assert sliced_wasserstein(a, a + 1.0, generator=g()) > sliced_wasserstein(a, a + 0.1, generator=g()) > 0
