"""The CUDA snapshot path: an asynchronous copy to pinned memory that the next update waits for.

Runs where a GPU is present (skipped on CPU machines).
"""

import pytest
import torch

from raypod.worker import snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(8, 256, device="cuda")).square().mean().backward()
    opt.step()
    return model, opt


def test_snapshot_is_the_state_at_take_time_even_when_the_next_update_follows_at_once() -> None:
    model, opt = _model_and_optimizer()
    expected = [t.detach().cpu().clone() for t in snapshot.state_tensors(model, opt)]
    snap = snapshot.take(model, opt)
    assert snap.flat.is_pinned()
    # the next step: its update must not reach the copy still in flight
    model(torch.randn(8, 256, device="cuda")).square().mean().backward()
    snapshot.before_update(snap)
    opt.step()
    after = [t.detach().cpu() for t in snapshot.state_tensors(model, opt)]
    assert any(not torch.equal(a, e) for a, e in zip(after, expected, strict=True))
    for got, want in zip(snap, expected, strict=True):
        assert torch.equal(got, want)


def test_restore_puts_a_cuda_snapshot_back() -> None:
    model, opt = _model_and_optimizer()
    snap = snapshot.take(model, opt)
    want = [t.detach().cpu().clone() for t in snapshot.state_tensors(model, opt)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    snapshot.restore(model, opt, snap)
    for got, w in zip(snapshot.state_tensors(model, opt), want, strict=True):
        assert torch.equal(got.cpu(), w)
