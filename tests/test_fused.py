"""table_attention (dynpos.model.fused) against the eager reference: outputs and all gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dynpos.model import fused
from dynpos.model.attention import causal_mask, eager_attention
from dynpos.model.fused import table_attention, table_mask
from dynpos.positional.base import toeplitz

B, H, D = 2, 3, 16
TOL = dict(atol=1e-5, rtol=1e-4)


def reference(q, k, v, table):
    n = q.shape[-2]
    return eager_attention(q, k, v, causal_mask(toeplitz(table[:, :n], n), n, n, q.device, q.dtype))


def inputs(n, dtype=torch.float32, table_len=None, seed=0, batch=B):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, H, n, D, generator=gen, dtype=dtype).requires_grad_() for _ in range(3))
    table = torch.randn(H, table_len or n, generator=gen).requires_grad_()
    return q, k, v, table


def grads(out, tensors, grad_out):
    return torch.autograd.grad(out, tensors, grad_out, allow_unused=True)


def assert_matches_reference(q, k, v, table):
    """table_attention equals the eager reference in the output and the gradients of q, k, v, table."""
    out = table_attention(q, k, v, table)
    ref = reference(q, k, v, table)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    for got, want in zip(grads(out, (q, k, v, table), g), grads(ref, (q, k, v, table), g)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.fixture(params=["default", "tiny_chunks"])
def chunking(request, monkeypatch):
    """Default chunk sizes, and tiny ones that split every test size into many chunks and
    batch groups of one (so chunk edges, the two-call forward and the group loop are covered)."""
    if request.param == "tiny_chunks":
        monkeypatch.setattr(fused, "FWD_CHUNK", 16)
        monkeypatch.setattr(fused, "ROW_CHUNK", 8)
        monkeypatch.setattr(fused, "BLOCK_ELEMS", 1)
    return request.param


@pytest.mark.parametrize("n", [1, 7, 64, 130])
def test_matches_eager_outputs_and_gradients(n, chunking):
    q, k, v, table = inputs(n)
    assert_matches_reference(q, k, v, table)


@pytest.mark.parametrize("workers, batch", [(1, 2), (2, 3), (3, 1), (4, 2)])
def test_worker_splits(workers, batch, monkeypatch):
    """Batch split (uneven too), head split (batch 1), more workers than parts; threads restored."""
    monkeypatch.setattr(fused, "WORKERS", workers)
    monkeypatch.setattr(fused, "FWD_CHUNK", 16)
    threads = torch.get_num_threads()
    q, k, v, table = inputs(37, batch=batch)
    assert_matches_reference(q, k, v, table)
    assert torch.get_num_threads() == threads


def test_worker_error_propagates_and_threads_restored():
    threads = torch.get_num_threads()

    def part(i):
        if i == 1:
            raise RuntimeError("part failed")
        return i

    with pytest.raises(RuntimeError, match="part failed"):
        fused._run_parts(part, [(0,), (1,), (2,)])
    assert torch.get_num_threads() == threads
    assert fused._run_parts(part, [(0,), (2,)]) == [0, 2]


def test_expanded_output_gradient():
    """``out.sum().backward()`` hands backward a zero-stride gradient."""
    q, k, v, table = inputs(20)
    table_attention(q, k, v, table).sum().backward()
    got = [t.grad for t in (q, k, v, table)]
    for t in (q, k, v, table):
        t.grad = None
    reference(q, k, v, table).sum().backward()
    for a, t in zip(got, (q, k, v, table)):
        torch.testing.assert_close(a, t.grad, **TOL)


def test_table_from_mlp_receives_gradients(chunking):
    n = 70
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, H))
    distances = torch.arange(n, dtype=torch.float32).unsqueeze(-1)
    q, k, v, _ = inputs(n)
    g = torch.randn(B, H, n, D)
    params = (q, k, v, *mlp.parameters())
    table = mlp(distances).T
    table.retain_grad()
    table_attention(q, k, v, table).backward(g)
    got = [p.grad.clone() for p in params] + [table.grad]
    for p in params:
        p.grad = None
    table = mlp(distances).T
    table.retain_grad()
    reference(q, k, v, table).backward(g)
    want = [p.grad for p in params] + [table.grad]
    for a, b in zip(got[:3] + got[-1:], want[:3] + want[-1:]):  # q, k, v, table
        torch.testing.assert_close(a, b, **TOL)
    # The MLP chain multiplies rounding by distances up to n - 1 (and the last bias's gradient,
    # sum_r dtable[h, r], is exactly 0 in real arithmetic): float32 rounding of the largest
    # MLP gradient is the scale.
    scale = max(1.0, max(b.abs().max().item() for b in want[3:-1]))
    for a, b in zip(got[3:-1], want[3:-1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * scale)
    assert all(a.abs().sum() > 0 for a in got[3:-1:2])  # the weights


def test_zero_table_is_plain_causal_attention(chunking):
    n = 50
    q, k, v, _ = inputs(n)
    table = torch.zeros(H, n, requires_grad=True)
    out = table_attention(q, k, v, table)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, (q, k, v), g), grads(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, **TOL)


def test_gradcheck_float64(monkeypatch):
    """The CPU flash kernel runs float64, so gradcheck applies; tiny chunks cover the chunking."""
    monkeypatch.setattr(fused, "FWD_CHUNK", 2)
    monkeypatch.setattr(fused, "ROW_CHUNK", 2)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    table = torch.randn(2, 5, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(table_attention, (q, k, v, table))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_float32_eager(dtype, chunking):
    n = 100
    q, k, v, table = inputs(n, dtype)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = table_attention(q, k, v, table)
    assert out.dtype == dtype
    ref = reference(q32, k32, v32, table)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    g = torch.randn(out.shape)
    got = grads(out, (q, k, v, table), g.to(dtype))
    want = grads(ref, (q32, k32, v32, table), g)
    for a, b, t in zip(got, want, (q, k, v, table)):
        assert a.dtype == t.dtype
        # the table gradient sums B·n terms: compare relative to its scale
        torch.testing.assert_close(a.float(), b, atol=2e-2 * max(1.0, b.abs().max().item()), rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_backward_is_float32_inside(dtype):
    """At D=32 the scale 1/sqrt(32) is not exact in bf16/fp16: the backward must widen q, k, v
    before scaling, or the recomputed weights drift from the forward's log-sum-exp (measured:
    2-3e-2 relative gradient error against float64 instead of about 5e-3 in bf16)."""
    gen = torch.Generator().manual_seed(0)
    d, n = 32, 128
    q, k = ((3 * torch.randn(2, 4, n, d, generator=gen)).to(dtype) for _ in range(2))
    v = torch.randn(2, 4, n, d, generator=gen).to(dtype)
    table = torch.randn(4, n, generator=gen)
    g = torch.randn(2, 4, n, d, generator=gen).to(dtype)
    low = [t.clone().requires_grad_() for t in (q, k, v, table)]
    exact = [t.double().requires_grad_() for t in (q, k, v, table)]
    got = grads(table_attention(*low), low, g)
    want = grads(reference(*exact), exact, g.double())
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= 1e-2 * b.abs().max()


def test_longer_table_and_partial_requires_grad():
    n = 40
    q, k, v, table = inputs(n, table_len=64)
    g = torch.randn(B, H, n, D)
    got = grads(table_attention(q, k, v, table), (q, table), g)
    want = grads(reference(q, k, v, table), (q, table), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.all(got[1][:, n:] == 0)
    # only the table needs a gradient (frozen q, k, v), then only q
    q2, k2, v2 = (t.detach() for t in (q, k, v))
    (dt,) = grads(table_attention(q2, k2, v2, table), (table,), g)
    torch.testing.assert_close(dt, want[1], **TOL)
    (dq,) = grads(table_attention(q, k2, v2, table.detach()), (q,), g)
    torch.testing.assert_close(dq, want[0], **TOL)


def test_non_contiguous_inputs_and_no_grad():
    n = 33
    x = torch.randn(B, n, 3 * H * D)
    q, k, v = rearrange(x, "b t (three h d) -> three b h t d", three=3, h=H)
    table = torch.randn(H, n)
    assert not q.is_contiguous()
    with torch.no_grad():
        out = table_attention(q, k, v, table)
    torch.testing.assert_close(out, reference(q, k, v, table), **TOL)


def test_refuses_what_the_kernel_cannot_do():
    """No silent fallback inside the kernel: other devices and integer tensors are refused (the
    model's choose_attention never sends them here), and there is no dropout argument."""
    q = torch.randn(B, H, 5, D)
    with pytest.raises(ValueError, match="CPU kernel"):
        table_attention(q, q, q, torch.randn(H, 5, device="meta"))
    with pytest.raises(ValueError, match="float table"):
        table_attention(q, q, q, torch.ones(H, 5, dtype=torch.long))
    with pytest.raises(TypeError):
        table_attention(q, q, q, torch.randn(H, 5), dropout_p=0.1)


def test_registered_ops_and_output_layout():
    """The custom ops exist under torch.ops.dynpos, and the output has the layout the fake
    implementation promises (Inductor asserts it), whatever the input layout."""
    assert hasattr(torch.ops.dynpos, "table_attention_fwd") and hasattr(torch.ops.dynpos, "table_attention_bwd")
    for n in (20, 300):  # one flash call, and the chunked forward
        for contiguous in (True, False):
            x = torch.randn(B, n, 3 * H * D)
            q, k, v = rearrange(x, "b t (three h d) -> three b h t d", three=3, h=H)
            if contiguous:
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out, lse = torch.ops.dynpos.table_attention_fwd(q, k, v, torch.randn(H, n))
            assert out.stride() == fused._fwd_outputs(q)[0].stride() and lse.is_contiguous()
            assert lse.shape == (B, H, n) and lse.dtype == torch.float32


def test_empty_sizes():
    for shape in [(B, H, 0, D), (0, H, 5, D)]:
        q = torch.randn(shape, requires_grad=True)
        table = torch.randn(H, shape[2], requires_grad=True)
        out = table_attention(q, q, q, table)
        assert out.shape == shape
        out.sum().backward()


def test_table_mask_layout():
    table = torch.randn(H, 9)
    mask = table_mask(table, 6)
    assert mask.shape == (1, H, 6, 6) and mask.is_contiguous()
    torch.testing.assert_close(mask, causal_mask(toeplitz(table[:, :6], 6), 6, 6, table.device, table.dtype))


@pytest.mark.parametrize(
    "shapes, kwargs, match",
    [
        (((B, H, 5, D), (B, H, 6, D), (B, H, 5, D), (H, 5)), {}, "one shape"),
        (((B, H, 5, D),) * 3 + ((H + 1, 5),), {}, "table must be"),
        (((B, H, 5, D),) * 3 + ((H, 4),), {}, "m >= n"),
        (((B, H, 5, 0),) * 3 + ((H, 5),), {}, "D must be"),
    ],
)
def test_bad_arguments_raise(shapes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        table_attention(*(torch.randn(s) for s in shapes), **kwargs)


def test_mixed_dtypes_raise():
    q = torch.randn(B, H, 5, D)
    with pytest.raises(ValueError, match="share a dtype"):
        table_attention(q, q.double(), q, torch.randn(H, 5))


def test_future_keys_get_exactly_zero_gradient(chunking):
    """Causality holds exactly in the backward: the output at query x has zero gradient, not a
    tiny one, for the keys and values after x (the backward's exp floor keeps masked weights 0)."""
    q, k, v, table = inputs(70)
    x = 40
    table_attention(q, k, v, table)[:, :, x].sum().backward()
    assert torch.all(k.grad[:, :, x + 1:] == 0) and torch.all(v.grad[:, :, x + 1:] == 0)
    assert k.grad[:, :, :x + 1].abs().sum() > 0 and v.grad[:, :, :x + 1].abs().sum() > 0
    assert torch.all(table.grad[:, x + 1:] == 0)  # distances beyond x are not seen by query x


def test_steep_bias_matches_eager(chunking):
    """A bias far below -40 nats (-129 at the far end of the steepest head here; the backward
    drops weights under exp(-39.8)) still gives eager's gradients."""
    q, k, v, _ = inputs(130)
    slopes = torch.tensor([1.0, 0.5, 1 / 256]).unsqueeze(1)
    table = (-slopes * torch.arange(130.0)).requires_grad_()
    assert_matches_reference(q, k, v, table)
