"""FlatParameters (one buffer for parameters and gradients) against plain per-parameter autograd."""
import copy

import torch

from policygrad.config import Config
from policygrad.flat import FlatParameters, clip_grad_norm_, keep_adam_moments_adjacent
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


def test_adam_moments_kept_adjacent_step_like_plain_adam_also_after_a_state_reload():
    torch.manual_seed(0)
    start = torch.randn(1_000)
    ours, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([ours], lr=0.01, fused=True)
    keep_adam_moments_adjacent(opt)
    twin = torch.optim.Adam([plain], lr=0.01, fused=True)

    def step(k: int) -> None:
        grad = torch.randn(1_000, generator=torch.Generator().manual_seed(k))
        for p, o in ((ours, opt), (plain, twin)):
            p.grad = grad.clone()
            o.step()

    def assert_adjacent_and_equal() -> None:
        state = opt.state[ours]
        both = state["exp_avg"].untyped_storage()
        assert both.data_ptr() == state["exp_avg_sq"].untyped_storage().data_ptr()
        assert state["exp_avg_sq"].storage_offset() == state["exp_avg"].storage_offset() + ours.numel()
        assert torch.equal(ours, plain)
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name], twin.state[plain][name]), name

    for k in range(3):
        step(k)
    assert_adjacent_and_equal()
    # a resume loads separate tensors; the next step puts them side by side again
    saved = opt.state_dict()
    opt.load_state_dict({"state": {0: {k: v.clone() for k, v in saved["state"][0].items()}},
                         "param_groups": saved["param_groups"]})
    assert opt.state[ours]["exp_avg_sq"].untyped_storage().data_ptr() != opt.state[ours]["exp_avg"].untyped_storage().data_ptr()
    step(3)
    assert_adjacent_and_equal()
