"""FlatParameters (one buffer for parameters and gradients) against plain per-parameter autograd."""
import copy

import torch

from policygrad.config import Config
from policygrad.flat import FlatParameters, clip_grad_norm_
from policygrad.control.rollout import build_policy


def test_flat_gradients_and_steps_match_separate_parameters():
    plain = build_policy(Config(env="Pendulum-v1"), seed=0)
    flat_policy = copy.deepcopy(plain)
    flat = FlatParameters(flat_policy.parameters())
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        plain.zero_grad(set_to_none=True)
        (plain.actor_output(x).square().sum() + plain.value(x).sum()).backward()
        flat.zero_grad()
        (flat_policy.actor_output(x).square().sum() + flat_policy.value(x).sum()).backward()
        # log_std takes no part in this loss: no gradient there, zeros in the flat buffer
        expected = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in plain.parameters()])
        torch.testing.assert_close(flat.param.grad, expected, rtol=0, atol=0)
        with torch.no_grad():  # a step on the flat buffer moves every module parameter
            for p in plain.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
            flat.param -= 0.1 * flat.param.grad
        for a, b in zip(plain.parameters(), flat_policy.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flat_clip_matches_torch_clip_grad_norm():
    for max_norm in (0.5, 1e6):
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
        flat = FlatParameters(params)
        for p, r in zip(params, reference):
            g = torch.randn_like(p)
            p.grad.copy_(g)
            r.grad = g.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm).item()
        assert abs(clip_grad_norm_([flat], max_norm) - expected_norm) < 1e-5
        for p, r in zip(params, reference):
            torch.testing.assert_close(p.grad, r.grad)
