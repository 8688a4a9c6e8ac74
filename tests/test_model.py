"""The GPT with DPB: attention paths agree, cached decoding equals a full pass, it learns real text."""

import functools
import logging

import pytest
import torch

from dynpos import GPT, GPTConfig, KVCache
from dynpos.model import attention
from dynpos.model.attention import choose_attention
from dynpos.positional import DPB, ALiBi, NoPE

SONNET_18 = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


def tiny(attn="sdpa", shared=False, seed=0, **sizes) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{"vocab_size": 50, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, "attn": attn, **sizes})
    return GPT(config, pos=functools.partial(DPB, shared=shared))


def test_logits_shape_and_loss():
    model = tiny()
    idx = torch.randint(0, 50, (3, 17))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 17, 50)
    assert loss.shape == () and 3.0 < loss.item() < 5.0  # about ln(50) = 3.9 at init
    assert model(idx)[1] is None


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("path, ran", [("fused", "fused"), ("sdpa", "sdpa"), ("auto", "fused")])
def test_paths_agree_with_eager_in_outputs_and_gradients(shared, path, ran, monkeypatch):
    """80 tokens: past AUTO_EAGER_MAX, so auto trains on the fused kernel (counted), not eager."""
    calls = []
    real = attention.table_attention
    monkeypatch.setattr(attention, "table_attention", lambda *a: calls.append(1) or real(*a))
    idx = torch.randint(0, 50, (2, 80), generator=torch.Generator().manual_seed(1))
    results = {}
    for p in (path, "eager"):
        model = tiny(p, shared=shared, block_size=80)
        assert model.attention_choice(80, 80, "cpu").path == (ran if p == path else "eager")
        logits, loss = model(idx, idx)
        loss.backward()
        results[p] = (logits, {n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == (2 if ran == "fused" else 0)  # one per block
    (la, ga), (lb, gb) = results[path], results["eager"]
    assert torch.allclose(la, lb, atol=1e-5)
    assert ga.keys() == gb.keys() and any("pos.dpbs" in n for n in ga)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), name


CPU = dict(device="cpu", cached=False, dropout=0.0)


@pytest.mark.parametrize("attn, kwargs, path, fallback", [
    # auto on the CPU: learned table trains on fused past 64 positions, on eager up to 64
    ("auto", dict(bias="table", learned=True, grad=True, length=65), "fused", False),
    ("auto", dict(bias="table", learned=True, grad=True, length=64), "eager", False),
    ("auto", dict(bias="table", learned=True, grad=False, length=8), "fused", False),
    # a fixed table (ALiBi): grad-free sdpa mask in training, fused for inference
    ("auto", dict(bias="table", learned=False, grad=True, length=500), "sdpa", False),
    ("auto", dict(bias="table", learned=False, grad=False, length=500), "fused", False),
    # no table, a cache, another device: sdpa; asked-for fused says it fell back
    ("auto", dict(bias="none", learned=False, grad=True, length=500), "sdpa", False),
    ("auto", dict(bias="grid", learned=True, grad=True, length=500), "sdpa", False),
    ("auto", dict(bias="table", learned=True, grad=False, length=9, cached=True), "sdpa", False),
    ("auto", dict(bias="table", learned=True, grad=True, length=500, device="meta"), "sdpa", False),
    ("fused", dict(bias="table", learned=True, grad=True, length=8), "fused", False),
    ("fused", dict(bias="none", learned=False, grad=True, length=500), "sdpa", True),
    ("fused", dict(bias="table", learned=True, grad=False, length=9, cached=True), "sdpa", True),
    ("fused", dict(bias="table", learned=True, grad=True, length=500, device="meta"), "sdpa", True),
    # dropout: the fused kernel has none
    ("auto", dict(bias="table", learned=True, grad=True, length=500, dropout=0.1), "eager", True),
    ("fused", dict(bias="table", learned=True, grad=True, length=500, dropout=0.1), "eager", True),
    # taken as asked
    ("sdpa", dict(bias="table", learned=True, grad=True, length=500), "sdpa", False),
    ("eager", dict(bias="none", learned=False, grad=True, length=500), "eager", False),
    ("flex", dict(bias="table", learned=True, grad=False, length=500), "flex", False),
])
def test_choose_attention_rules(attn, kwargs, path, fallback):
    choice = choose_attention(attn, **{**CPU, **kwargs})
    assert (choice.path, choice.fallback) == (path, fallback), choice.reason


def test_choose_attention_refuses_bad_input():
    with pytest.raises(ValueError, match="model.attn='cuda'"):
        choose_attention("cuda", bias="table", learned=True, grad=True, length=8, **CPU)
    with pytest.raises(ValueError, match="model.attn=flex cannot train on CPU"):
        choose_attention("flex", bias="table", learned=True, grad=True, length=8, **CPU)


def test_fallback_is_logged_once_per_reason(caplog, monkeypatch):
    """model.dropout > 0 trains DPB on eager: the model says so once, not at every step."""
    monkeypatch.setattr(attention, "_reported", set())
    model = tiny("auto", dropout=0.1, block_size=80)
    idx = torch.randint(0, 50, (1, 80))
    with caplog.at_level(logging.WARNING, logger="dynpos.model.attention"):
        for _ in range(2):
            model(idx, idx)[1].backward()
        with torch.no_grad():
            model.eval()(idx)  # evaluation: no dropout, fused, nothing to report
    assert model.train().attention_choice(80, 80, "cpu").path == "eager"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "no dropout" in messages[0] and "model.dropout=0.1" in messages[0]


def test_attention_choice_reads_the_scheme():
    """The model hands choose_attention its scheme's bias kind and whether it is learned."""
    dpb = tiny("auto")
    alibi = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32), pos=ALiBi)
    nope = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32), pos=NoPE)
    assert dpb.attention_choice(65, 65, "cpu").path == "fused"
    assert dpb.attention_choice(1, 8, "cpu", KVCache(2)).path == "sdpa"
    assert alibi.attention_choice(100, 100, "cpu").path == "sdpa"
    assert nope.attention_choice(100, 100, "cpu").path == "sdpa"
    with torch.no_grad():
        assert alibi.attention_choice(8, 8, "cpu").path == "fused"
        assert dpb.attention_choice(8, 8, "cpu").path == "fused"


@pytest.mark.slow
def test_flex_agrees_with_eager_forward():
    idx = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        flex = tiny("flex")(idx)[0]
        eager = tiny("eager")(idx)[0]
    assert torch.allclose(flex, eager, atol=1e-5)
    # Gradients: torch 2.13 has no FlexAttention backward on CPU; the path refuses to train there.
    print("flex gradients not compared on CPU: torch has no CPU FlexAttention backward")
    model = tiny("flex")
    with pytest.raises(ValueError, match="model.attn=flex cannot train on CPU"):
        model(idx, idx)[1].backward()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("path", ["auto", "sdpa", "eager"])
def test_kv_cache_decoding_equals_full_forward(shared, path):
    model = tiny(path, shared=shared).eval()
    idx = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(model.config.n_layer)
        prefix = model(idx[:, :5], cache=cache)[0]  # a prompt of 5 tokens, then one at a time
        steps = [prefix] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 20)]
    assert cache.length == 20
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_decoding_computes_the_dpb_tables_once(shared):
    """Through a cache, the DPB MLP runs for the prompt and once more for the tables kept in the
    cache (block_size distances), not at every token; past block_size the tables grow once."""
    model = tiny("auto", shared=shared).eval()
    calls = []
    for dpb in model.pos.dpbs:
        dpb.mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    per_pass = 1 if shared else model.config.n_layer
    with torch.no_grad():
        cache = KVCache(model.config.n_layer)
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
        for _ in range(40):  # 5 + 40 tokens: past block_size 32 the kept tables double to 64
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert calls == [5] * per_pass + [32] * per_pass + [64] * per_pass
    assert cache.tables[0].shape == (4, 64)


def test_shared_dpb_is_one_module_computed_once():
    model = tiny(shared=True, n_layer=3)
    assert len(model.pos.dpbs) == 1
    calls = []
    model.pos.dpbs[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randint(0, 50, (1, 8)))
    assert len(calls) == 1
    per_layer = tiny(shared=False, n_layer=3)
    assert len(per_layer.pos.dpbs) == 3


def test_num_params_matches_hand_count():
    V, C, H, L, d = 10, 8, 2, 1, 4
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=8, n_layer=L, n_head=H, n_embd=C), pos=functools.partial(DPB, dim=d))
    block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    dpb = (1 * d + d) + (d * d + d) + (d * H + H)
    assert model.num_params() == V * C + L * (block + dpb) + 2 * C
    assert model.lm_head.weight is model.wte.weight


def test_generate_uses_cache_and_slides_past_block_size():
    model = tiny(block_size=16).eval()
    idx = torch.randint(0, 50, (2, 4))
    out = model.generate(idx, max_new_tokens=30, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 34) and torch.equal(out[:, :4], idx)
    assert out.min() >= 0 and out.max() < 50
    # Greedy decoding through the cache equals greedy decoding by full recomputation.
    greedy = model.generate(idx, max_new_tokens=10, temperature=1e-6)
    ref = idx
    with torch.no_grad():
        for _ in range(10):
            ref = torch.cat([ref, model(ref[:, -16:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, ref)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_k": 51}, "top_k"), ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_generate_rejects_bad_arguments(kwargs, fragment):
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        tiny().generate(torch.zeros(1, 1, dtype=torch.long), **args)


@pytest.mark.parametrize("sizes, fragment", [
    ({"n_embd": 30, "n_head": 4}, "n_embd=30 is not divisible by model.n_head=4"),
    ({"n_layer": 0}, "model.n_layer"), ({"attn": "cuda"}, "model.attn"), ({"dropout": 1.0}, "model.dropout"),
])
def test_config_errors(sizes, fragment):
    with pytest.raises(ValueError, match=fragment):
        GPTConfig(**{"vocab_size": 10, "block_size": 8, **sizes})


@pytest.mark.slow
def test_overfits_one_batch_of_real_text_and_trains_every_dpb_parameter():
    chars = sorted(set(SONNET_18))
    data = torch.tensor([chars.index(c) for c in SONNET_18])
    block = 64
    starts = torch.arange(0, len(data) - block - 1, 40)[:8]
    x = torch.stack([data[s : s + block] for s in starts])
    y = torch.stack([data[s + 1 : s + block + 1] for s in starts])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=block, n_layer=2, n_head=4, n_embd=64))
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    first = None
    for step in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first = loss.item()
            for name, p in model.pos.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    assert first > 3.0
    assert loss.item() < 0.1
