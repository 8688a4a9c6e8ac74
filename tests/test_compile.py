"""torch.compile of the model: the fused op inside one graph, compiled == eager, clean state dicts,
and FlexAttention generation that compiles a bounded number of graphs."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dynpos import GPT, GPTConfig
from dynpos.model import compile_model
from dynpos.model import attention
from dynpos.model.fused import table_attention
from dynpos.positional import DPB

FWD = torch.ops.dynpos.table_attention_fwd.default


def model(attn="auto", block=256, n_layer=4, n_head=4, n_embd=128, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, attn=attn, **kw)
    return GPT(config, pos=functools.partial(DPB))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_micro_dpb_training_forward_has_no_graph_break():
    """The micro model (4 x 4 x 128) at block 256 trains on the fused path: Dynamo traces the
    forward and the loss into ONE graph holding the fused op once per block."""
    m = model()
    x = torch.randint(65, (1, 256), generator=torch.Generator().manual_seed(0))
    assert m.attention_choice(256, 256, "cpu").path == "fused"
    explained = torch._dynamo.explain(lambda idx: m(idx, idx)[1])(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum(t in (FWD, torch.ops.dynpos.table_attention_fwd) for t in ops) == 4


def eager_and_compiled_step(backend: str, attn: str = "fused", block: int = 48):
    """Loss and every parameter gradient (DPB MLPs included) of one step, eager and compiled."""
    x = torch.randint(65, (2, block), generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        m = model(attn, block=block, n_layer=2, n_head=2, n_embd=32)
        step = torch.compile(lambda idx: m(idx, idx)[1], backend=backend, fullgraph=True) if compiled else (
            lambda idx: m(idx, idx)[1])
        loss = step(x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    return results


def assert_same_step(results):
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-6)
    assert grads_c.keys() == grads_e.keys() and any("pos.dpbs" in n for n in grads_c)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_step_matches_eager_through_aot_autograd():
    """AOTAutograd traces the op's fake forward, its registered autograd and fake backward
    (fullgraph: a graph break would raise); the compiled step equals eager."""
    assert_same_step(eager_and_compiled_step("aot_eager"))


@pytest.mark.slow
def test_compiled_step_matches_eager_with_inductor():
    """The real compiler (Inductor, C++ codegen): loss and every gradient to float32 rounding."""
    assert_same_step(eager_and_compiled_step("inductor"))


def test_compiled_op_table_gradient_matches_eager():
    """The op alone, compiled with its backward: the gradient of a leaf table (and q, k, v)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=gen, requires_grad=True) for _ in range(3))
    table = torch.randn(3, 40, generator=gen, requires_grad=True)
    g = torch.randn(2, 3, 40, 8, generator=gen)
    compiled = torch.compile(table_attention, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, table), (q, k, v, table), g)
    want = torch.autograd.grad(table_attention(q, k, v, table), (q, k, v, table), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_compile_model_keeps_state_dict_keys_and_reports_fallbacks(caplog, monkeypatch):
    """compile_model compiles in place: checkpoints carry no ``_orig_mod.`` prefix (nanoGPT
    #325); a fallback (dropout on a table scheme) is logged before compiling, since nothing is
    logged inside a compiled graph, and the compiled forward has no graph break for it."""
    monkeypatch.setattr(attention, "_reported", set())
    m = model(block=80, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    keys = list(m.state_dict())
    with caplog.at_level(logging.WARNING, logger="dynpos.model.attention"):
        assert compile_model(m) is m
    assert list(m.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    assert m.training and len(caplog.records) == 1 and "no dropout" in caplog.records[0].getMessage()
    x = torch.randint(65, (1, 80))
    explained = torch._dynamo.explain(m.forward)(x, x)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow
def test_flex_generation_compiles_a_bounded_number_of_graphs():
    """20 generated tokens through the KV cache on model.attn=flex: two graphs (the prompt, the
    one-token steps), not one per key length; the tokens equal sdpa's (greedy)."""
    prompt = torch.randint(65, (1, 8), generator=torch.Generator().manual_seed(3))
    flex = model("flex", block=64, n_layer=2, n_head=2, n_embd=32).eval()
    sdpa = model("sdpa", block=64, n_layer=2, n_head=2, n_embd=32).eval()
    out = flex.generate(prompt, 20, temperature=1e-6)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert torch.equal(out, sdpa.generate(prompt, 20, temperature=1e-6))


@pytest.mark.slow
def test_compiled_flex_forward_has_no_graph_break():
    """A 2-layer GPT on model.attn=flex (evaluation: no CPU FlexAttention backward) traces without a
    graph break: the compiled flex kernels are looked up in a dict Dynamo can trace."""
    m = model("flex", block=32, n_layer=2, n_head=2, n_embd=16).eval()
    x = torch.randint(65, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        explained = torch._dynamo.explain(m.forward)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
