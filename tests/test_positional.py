"""Closed-form tests of every positional scheme, and of each scheme inside the GPT.

Each scheme's formula is checked against values worked out by hand; then, for every scheme, the
GPT's cached decoding reproduces a full forward pass, gradients reach every scheme parameter, the
sdpa and eager attention paths agree, and the scheme's YAML builds a working model.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dynpos import GPT, GPTConfig, KVCache
from dynpos.positional import (
    FIRE, KERPLE, SCHEMES, T5, ALiBi, Learned, NoPE, PositionalScheme, RoPE, Sinusoidal, alibi_slopes, t5_bucket,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pos"
ALL = sorted(SCHEMES)


def tiny(attn: str = "sdpa", n_layer: int = 2) -> GPTConfig:
    return GPTConfig(vocab_size=13, block_size=12, n_layer=n_layer, n_head=2, n_embd=16, attn=attn)


def tokens(t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 13, (2, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- ALiBi

def test_alibi_slopes_power_of_two_heads():
    assert alibi_slopes(8) == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    assert alibi_slopes(1) == [1 / 256]


def test_alibi_slopes_other_head_counts_follow_the_papers_rule():
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every other 8-head slope (2^-1, 2^-3).
    assert alibi_slopes(6) == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    # 3 heads: the 2-head slopes 2^-4, 2^-8, then the first of the odd 4-head slopes (2^-2).
    assert alibi_slopes(3) == [1 / 16, 1 / 256, 1 / 4]


def test_alibi_bias_is_minus_slope_times_distance():
    i, j = 3, 7
    bias = ALiBi(n_layer=2, n_head=8, n_embd=16, block_size=8).bias(0, i, j)
    assert bias.shape == (8, i, j)
    for h, m in enumerate(alibi_slopes(8)):
        for x in range(i):
            q = j - i + x
            for y in range(j):
                expected = -m * (q - y) if y <= q else 0.0
                assert bias[h, x, y].item() == pytest.approx(expected, abs=1e-6)


def test_alibi_shares_one_bias_across_blocks_and_has_no_parameters():
    alibi = ALiBi(n_layer=3, n_head=4, n_embd=16, block_size=8)
    biases = alibi.biases(4, 4)
    assert all(b is biases[0] for b in biases)
    assert list(alibi.parameters()) == []
    assert "slopes" not in alibi.state_dict()


# ------------------------------------------------------------------------------------------ RoPE

def test_rope_rotates_channel_pairs_by_position_times_frequency():
    # head_dim 4, rotate-half layout: channel 0 pairs with 2 (frequency 1), 1 with 3 (10000^(-1/2)).
    rope = RoPE(n_layer=1, n_head=1, n_embd=4, block_size=8)
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    e1 = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    p = 3
    q, k = rope.rotate(e0, e1, offset=p)
    assert q.flatten().tolist() == pytest.approx([math.cos(3), 0, math.sin(3), 0], abs=1e-6)
    assert k.flatten().tolist() == pytest.approx([0, math.cos(0.03), 0, math.sin(0.03)], abs=1e-6)
    # Far beyond block_size the cos/sin cache grows: position 1000 turns e0 by 1000 radians.
    q, _ = rope.rotate(e0, e0, offset=1000)
    assert q.flatten().tolist() == pytest.approx([math.cos(1000), 0, math.sin(1000), 0], abs=1e-4)


def test_rope_preserves_norms():
    rope = RoPE(n_layer=1, n_head=2, n_embd=16, block_size=8)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    q, k = rope.rotate(x, 2 * x, offset=5)
    torch.testing.assert_close(q.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(k.norm(dim=-1), 2 * x.norm(dim=-1))


def test_rope_score_depends_only_on_distance():
    rope = RoPE(n_layer=1, n_head=1, n_embd=8, block_size=8)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(p: int, p_key: int) -> float:
        return (rope.rotate(q, q, p)[0] * rope.rotate(k, k, p_key)[1]).sum().item()

    for p, p_key, shift in [(5, 2, 7), (3, 3, 40), (9, 0, 100)]:
        assert score(p + shift, p_key + shift) == pytest.approx(score(p, p_key), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)  # but it does depend on the distance


def test_rope_offset_equals_tail_of_longer_sequence():
    rope = RoPE(n_layer=1, n_head=2, n_embd=16, block_size=8)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    q_full, k_full = rope.rotate(q, k, 0)
    q_tail, k_tail = rope.rotate(q[:, :, 6:], k[:, :, 6:], 6)
    torch.testing.assert_close(q_tail, q_full[:, :, 6:])
    torch.testing.assert_close(k_tail, k_full[:, :, 6:])


def test_rope_partial_rotation_leaves_the_other_channels_alone():
    rope = RoPE(n_layer=1, n_head=1, n_embd=8, block_size=8, rotary_dim=0.5)
    assert rope.channels == 4
    x = torch.randn(1, 1, 5, 8, generator=torch.Generator().manual_seed(4))
    q, _ = rope.rotate(x, x, 2)
    assert torch.equal(q[..., 4:], x[..., 4:])
    assert not torch.allclose(q[..., :4], x[..., :4])


# -------------------------------------------------------------------------------------------- T5

def test_t5_buckets_of_hand_computed_distances():
    # 32 buckets, max_distance 128: distances 0..15 are exact; from 16 on the bucket is
    # 16 + floor(16 * ln(d / 16) / ln(8)), capped at 31.
    expected = {
        0: 0, 1: 1, 15: 15, 16: 16,
        20: 17,   # 16 * ln(1.25) / ln 8 = 1.72
        32: 21,   # 16 * ln 2 / ln 8 = 5.33
        64: 26,   # 16 * ln 4 / ln 8 = 10.67
        100: 30,  # 16 * ln 6.25 / ln 8 = 14.10
        127: 31,  # 15.94
        128: 31,  # 16 -> 32, capped
        1000: 31,
    }
    got = t5_bucket(torch.tensor(list(expected)), num_buckets=32, max_distance=128)
    assert got.tolist() == list(expected.values())
    # 8 buckets, max_distance 16: 0..3 exact, then 4 + floor(4 * ln(d / 4) / ln 4).
    assert t5_bucket(torch.tensor([3, 4, 8, 15, 16]), 8, 16).tolist() == [3, 4, 6, 7, 7]


def test_t5_buckets_around_twice_the_ablation_length():
    # 16 + floor(16 * ln(d / 16) / ln 8): 10.04 at d = 59, 10.90 at d = 66, 11.02 at d = 67, 11.36 at d = 70.
    # Bucket 26 holds 59..66, so a model trained on 64 tokens (distances 0..63) has trained the
    # bucket of 64..66 too; distances from 67 on (bucket 27 up) read untrained buckets.
    distances = list(range(59, 71))
    expected = [26] * 8 + [27] * 4  # 59..66, then 67..70
    assert t5_bucket(torch.tensor(distances)).tolist() == expected
    trained = set(t5_bucket(torch.arange(64)).tolist())
    assert trained == set(range(27))
    # The last bucket begins at ceil(16 * 8 ** (15 / 16)) = ceil(112.42) = 113, before max_distance.
    assert t5_bucket(torch.tensor([112, 113, 128, 10_000])).tolist() == [30, 31, 31, 31]


def test_t5_table_reads_the_embedding_of_each_bucket():
    t5 = T5(n_layer=2, n_head=3, n_embd=16, block_size=8, num_buckets=8, max_distance=16)
    table = t5.table(0, 20)
    weight = t5.embeddings[0].weight
    for r, bucket in [(0, 0), (3, 3), (4, 4), (8, 6), (19, 7)]:
        torch.testing.assert_close(table[:, r], weight[bucket])
    biases = t5.biases(5, 9)
    assert all(b is biases[0] for b in biases)
    unshared = T5(n_layer=2, n_head=3, n_embd=16, block_size=8, shared=False)
    assert len(unshared.embeddings) == 2


# ----------------------------------------------------------------------------- absolute schemes

def test_sinusoidal_values():
    sin = Sinusoidal(n_layer=1, n_head=1, n_embd=8, block_size=4, scale=1.0)
    pe = sin.absolute(3)
    assert pe.shape == (3, 8)
    assert pe[0, 0::2].tolist() == [0.0] * 4 and pe[0, 1::2].tolist() == [1.0] * 4
    # Position 5, pair i = 1: frequency 10000^(-2/8) = 0.1, angle 0.5.
    row = sin.absolute(1, offset=5)[0]
    assert row[2].item() == pytest.approx(math.sin(0.5), abs=1e-6)
    assert row[3].item() == pytest.approx(math.cos(0.5), abs=1e-6)
    assert row[0].item() == pytest.approx(math.sin(5.0), abs=1e-6)
    # No length limit, and the default amplitude is n_embd ** -0.5.
    assert sin.max_length is None
    scaled = Sinusoidal(n_layer=1, n_head=1, n_embd=8, block_size=4)
    torch.testing.assert_close(scaled.absolute(2, offset=100), sin.absolute(2, offset=100) / math.sqrt(8))


def test_learned_embedding_rows_and_limit():
    torch.manual_seed(0)
    learned = Learned(n_layer=1, n_head=1, n_embd=16, block_size=64)
    assert learned.max_length == 64
    assert torch.equal(learned.absolute(3, offset=4), learned.wpe[4:7])
    assert learned.wpe.std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="pos=learned"):
        learned.absolute(2, offset=63)


def test_learned_beyond_block_size_raises_in_the_gpt():
    model = GPT(tiny(), pos=Learned).eval()
    with pytest.raises(ValueError, match="pos=learned"):
        model(tokens(13))
    cache = KVCache(model.config.n_layer)
    model(tokens(12), cache=cache)
    with pytest.raises(ValueError, match="pos=learned"):
        model(tokens(1), cache=cache)


def test_nope_adds_nothing():
    for hook in ("absolute", "rotate", "table", "bias", "biases"):
        assert getattr(NoPE, hook) is getattr(PositionalScheme, hook)
    nope = NoPE(n_layer=2, n_head=2, n_embd=16, block_size=8)
    assert list(nope.parameters()) == [] and list(nope.buffers()) == []
    assert nope.absolute(4) is None and nope.table(0, 4) is None and nope.bias(0, 2, 4) is None
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    q2, k2 = nope.rotate(q, k, 5)
    assert q2 is q and k2 is k
    # Without positions, one causal block sees its context as a set: permuting the tokens before
    # the last one leaves the last position's logits unchanged.
    model = GPT(tiny(n_layer=1), pos=NoPE).eval()
    idx = tokens(8)
    permuted = torch.cat([idx[:, :7].flip(1), idx[:, 7:]], dim=1)
    assert not torch.equal(idx, permuted)
    torch.testing.assert_close(model(permuted)[0][:, -1], model(idx)[0][:, -1])


# ------------------------------------------------------------------------------------------ FIRE

def test_fire_inputs_are_normalised_distances_in_unit_interval():
    fire = FIRE(n_layer=1, n_head=2, n_embd=16, block_size=8)  # c = 0.1, L = 512
    i, j = 5, 9
    x = fire.inputs(0, i, j)
    causal = torch.ones(i, j, dtype=torch.bool).tril(j - i)
    assert x[causal].min().item() >= 0.0 and x[causal].max().item() < 1.0
    # Query 0 sits at x' = 4; key 1 is 3 away; L = 512 > x' + 1.
    assert x[0, 1].item() == pytest.approx(math.log(1 + 0.1 * 3) / math.log(1 + 0.1 * 512), rel=1e-5)
    # A small threshold: the normaliser is psi of the query's own position x' = 8 (counted from 0,
    # as in the paper's listing), so the farthest key reads psi(8) / (psi(8) + eps), just below 1.
    short = FIRE(n_layer=1, n_head=2, n_embd=16, block_size=8, init_L=2.0)
    psi8 = math.log(1 + 0.1 * 8)
    assert short.inputs(0, i, j)[4, 0].item() == pytest.approx(psi8 / (psi8 + 1e-6), rel=1e-6)
    assert short.inputs(0, i, j)[4, 3].item() == pytest.approx(math.log(1 + 0.1 * 5) / psi8, rel=1e-5)


def test_fire_bias_beyond_the_threshold_counts_positions_from_zero():
    # L = 4; query x' = 9 (the last of j = 10 positions) lies beyond L, so its normaliser is
    # psi(9) = log(1.9), not psi(10) = log(2.0); within L (x' = 3) it is psi(L) = log(1.4) either way.
    fire = FIRE(n_layer=1, n_head=2, n_embd=16, block_size=8, init_L=4.0)
    j = 10
    x = fire.inputs(0, j, j)
    assert x[9, 2].item() == pytest.approx(math.log(1.7) / (math.log(1.9) + 1e-6), rel=1e-6)  # distance 7
    assert x[3, 0].item() == pytest.approx(math.log(1.3) / (math.log(1.4) + 1e-6), rel=1e-6)  # distance 3
    assert x[4, 0].item() == pytest.approx(math.log(1.4) / (math.log(1.4) + 1e-6), rel=1e-6)  # x' = L
    # The bias is the MLP at that input: f(log 1.7 / log 1.9) for every head.
    expected = fire.mlps[0](torch.tensor([[math.log(1.7) / (math.log(1.9) + 1e-6)]]))[0]
    torch.testing.assert_close(fire.bias(0, j, j)[:, 9, 2], expected)


def test_fire_bias_at_distance_zero_is_the_mlp_at_zero():
    fire = FIRE(n_layer=1, n_head=3, n_embd=16, block_size=8)
    i, j = 4, 6
    bias = fire.bias(0, i, j)
    assert bias.shape == (3, i, j)
    at_zero = fire.mlps[0](torch.zeros(1, 1))[0]  # f(0), (heads,)
    for x in range(i):
        torch.testing.assert_close(bias[:, x, j - i + x], at_zero)
    biases = fire.biases(i, j)
    assert all(b is biases[0] for b in biases)
    assert len(FIRE(n_layer=3, n_head=2, n_embd=16, block_size=8, shared=False).mlps) == 3


# ---------------------------------------------------------------------------------------- KERPLE

def test_kerple_log_kernel_values():
    kerple = KERPLE(n_layer=2, n_head=3, n_embd=16, block_size=8, init="ones")
    table = kerple.table(1, 6)
    expected = torch.tensor([-math.log1p(r) for r in range(6)]).expand(3, 6)  # r1 = r2 = 1
    torch.testing.assert_close(table, expected)
    with torch.no_grad():
        kerple.r1[0].copy_(torch.tensor([0.5, 1.0, 2.0]))
        kerple.r2[0].copy_(torch.tensor([0.1, 1.0, 3.0]))
    table = kerple.table(0, 50)
    torch.testing.assert_close(table[:, 7], torch.tensor([-0.5 * math.log(1.7), -math.log(8.0), -2 * math.log(22.0)]))
    assert torch.equal(table[:, 0], torch.zeros(3))
    assert (table[:, 1:] < table[:, :-1]).all()  # strictly decreasing in distance


def test_kerple_init_is_the_authors_uniform_draw():
    # chijames/KERPLE: bias_p (r1) = 2 * torch.rand(heads), bias_a (r2) = torch.rand(heads), per layer,
    # clamped at 0.01. Replaying the same generator gives the same values, layer by layer, r1 first.
    torch.manual_seed(7)
    kerple = KERPLE(n_layer=3, n_head=512, n_embd=16, block_size=8)
    torch.manual_seed(7)
    draws = [(2 * torch.rand(512), torch.rand(512)) for _ in range(3)]
    clamped = 0
    for layer, (r1, r2) in enumerate(draws):
        assert torch.equal(kerple.r1[layer].data, r1.clamp(min=0.01))
        assert torch.equal(kerple.r2[layer].data, r2.clamp(min=0.01))
        clamped += int((r1 < 0.01).sum() + (r2 < 0.01).sum())
    r1 = torch.cat(list(kerple.r1)).detach()
    r2 = torch.cat(list(kerple.r2)).detach()
    assert (r1 >= 0.01).all() and (r1 < 2.0).all()  # float32 comparisons: the floor is float32(0.01)
    assert (r2 >= 0.01).all() and (r2 < 1.0).all()
    assert clamped > 0 and int((r1 == 0.01).sum() + (r2 == 0.01).sum()) == clamped  # some draws hit the floor
    assert r1.mean().item() == pytest.approx(1.0, abs=0.05) and r2.mean().item() == pytest.approx(0.5, abs=0.03)
    assert len(set(kerple.r1[0].tolist())) == 512  # per head, not one value for all


def test_kerple_floor_keeps_the_gradient_and_project_clamps_in_place():
    kerple = KERPLE(n_layer=1, n_head=2, n_embd=16, block_size=8, init="ones")
    with torch.no_grad():
        kerple.r1[0].copy_(torch.tensor([0.001, 1.5]))  # below the floor, as an optimizer step may leave it
        kerple.r2[0].copy_(torch.tensor([2.0, -0.3]))
    r1, r2 = kerple.coefficients(0)
    torch.testing.assert_close(r1, torch.tensor([0.01, 1.5]))
    torch.testing.assert_close(r2, torch.tensor([2.0, 0.01]))
    kerple.table(0, 4).sum().backward()
    # d/dr1 of -r1 * sum_r log(1 + r2 r) = -(log 3 + log 5 + log 7) for head 0: passed straight through.
    assert kerple.r1[0].grad[0].item() == pytest.approx(-math.log(105.0), rel=1e-6)
    assert kerple.r2[0].grad[1].item() != 0.0
    kerple.project_()
    assert kerple.r1[0].tolist() == pytest.approx([0.01, 1.5]) and kerple.r2[0].tolist() == pytest.approx([2.0, 0.01])


def test_kerple_loads_checkpoints_of_the_softplus_parameterisation():
    raw = torch.tensor([-1.0, 0.0, 2.0])
    old = {"r1_raw.0": raw, "r2_raw.0": 2 * raw}
    kerple = KERPLE(n_layer=1, n_head=3, n_embd=16, block_size=8)
    kerple.load_state_dict(old)
    torch.testing.assert_close(kerple.r1[0].data, F.softplus(raw))
    torch.testing.assert_close(kerple.r2[0].data, F.softplus(2 * raw))


# --------------------------------------------------------------------------- every scheme, in GPT

@pytest.mark.parametrize("name", ALL)
def test_cached_decoding_matches_full_forward(name):
    torch.manual_seed(0)
    model = GPT(tiny(), pos=SCHEMES[name]).eval()
    idx = tokens(12)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer)
        steps, start = [], 0
        for size in (5, 1, 1, 3, 1, 1):  # a prefill, then single tokens and a chunk
            steps.append(model(idx[:, start:start + size], cache=cache)[0])
            start += size
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter_and_paths_agree(name):
    torch.manual_seed(0)
    sdpa = GPT(tiny("sdpa"), pos=SCHEMES[name])
    eager = GPT(tiny("eager"), pos=SCHEMES[name])
    eager.load_state_dict(sdpa.state_dict())
    idx, targets = tokens(12, seed=1), tokens(12, seed=2)
    logits = {}
    for path, model in (("sdpa", sdpa), ("eager", eager)):
        logits[path], loss = model(idx, targets)
        loss.backward()
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-5, rtol=1e-5)
    for (key, p), q in zip(sdpa.pos.named_parameters(), eager.pos.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches pos.{key}"
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_learned_scalars_of_bias_schemes_are_not_weight_decayed():
    model = GPT(tiny(), pos=KERPLE)
    no_decay = {id(p) for p in model.optimizer_groups(0.1)[1]["params"]}
    assert all(id(p) in no_decay for p in model.pos.parameters())


def test_every_scheme_has_a_config_and_every_config_builds_a_gpt():
    files = {path.stem: path for path in CONFIGS.glob("*.yaml")}
    assert sorted(files) == ALL
    for name, path in files.items():
        cfg = OmegaConf.load(path)
        scheme = SCHEMES[name]
        assert cfg._target_ == f"dynpos.positional.{scheme.__name__}" and cfg._partial_ is True
        options = {p.name for p in inspect.signature(scheme).parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert set(cfg) - {"_target_", "_partial_"} == options, f"{path.name} must list every option of {name}"
        factory = hydra.utils.instantiate(cfg)
        model = GPT(tiny(), pos=factory)
        assert isinstance(model.pos, scheme) and model.pos.name == name
        logits, loss = model(tokens(12), tokens(12, seed=3))
        assert logits.shape == (2, 12, 13) and torch.isfinite(loss)


def test_a_scheme_keeps_the_name_it_sets_and_others_take_their_class_name():
    class MyScheme(PositionalScheme):
        name = "mine"

    class Other(MyScheme):
        pass

    assert (MyScheme.name, Other.name, RoPE.name) == ("mine", "other", "rope")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: RoPE(1, 2, 6, 8), r"pos=rope .* odd"),  # head_dim 3
        (lambda: RoPE(1, 1, 8, 8, rotary_dim=0.375), r"pos\.rotary_dim"),  # 3 channels
        (lambda: RoPE(1, 1, 8, 8, rotary_dim=0.0), r"pos\.rotary_dim"),
        (lambda: RoPE(1, 1, 8, 8, base=1.0), r"pos\.base"),
        (lambda: T5(1, 1, 8, 8, num_buckets=1), r"pos\.num_buckets"),
        (lambda: T5(1, 1, 8, 8, num_buckets=32, max_distance=16), r"pos\.max_distance"),
        (lambda: Learned(1, 1, 8, 0), r"model\.block_size"),
        (lambda: ALiBi(1, 0, 8, 8), r"model\.n_head"),
        (lambda: KERPLE(1, -2, 8, 8), r"model\.n_head"),
        (lambda: KERPLE(1, 2, 8, 8, init="zeros"), r"pos\.init='zeros' is invalid for pos=kerple: use uniform"),
        (lambda: FIRE(1, 1, 8, 8, dim=0), r"pos\.dim"),
        (lambda: FIRE(1, 1, 8, 8, init_c=0.0), r"pos\.init_c"),
        (lambda: Sinusoidal(1, 1, 8, 8, base=0.5), r"pos\.base"),
    ],
)
def test_invalid_options_are_refused_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()
