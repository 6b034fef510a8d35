"""The model's behaviour: causality, cached decoding, balancing, MTP targets, config errors."""

import pytest
import torch

from model.attention import MLA
from model.config import ConfigError, ModelConfig
from model.generate import compiled_step, generate, sample_next, stream
from model.moe import MoE
from model.transformer import Transformer, flops_per_token, parameter_counts, step_flops
from tests.model.helpers import BASE, config


def make(name="plain-q", seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(config(name, **overrides))


@pytest.mark.parametrize("name", ["plain-q", "q-lora", "dense"])
def test_causality(name):
    model = make(name).eval()
    ids = torch.randint(0, 97, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 7) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # equal up to float summation order (expert batches differ in size)
    torch.testing.assert_close(a[:, :15], b[:, :15], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "absorbed per step"])
@pytest.mark.parametrize("name", ["plain-q", "q-lora", "grouped", "yarn"])
def test_latent_cache_decoding_matches_full_forward(name, fold, monkeypatch):
    monkeypatch.setattr(MLA, "FOLD_MAX_GROWTH", MLA.FOLD_MAX_GROWTH if fold else 0.0)
    model = make(name).eval()
    assert all((cache.folded is not None) == fold for cache in model.new_caches(1, 1))
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        caches = model.new_caches(2, 30)
        slots = torch.arange(30)
        # a 10-token prefill, then one token at a time
        mask = (slots[:10, None] >= slots[None, :10]).expand(2, 10, 10)
        steps = [model.forward_cached(ids[:, :10], slots[:10].expand(2, 10), caches, 0, mask)]
        for t in range(10, 30):
            # one new token sees every slot: as an explicit mask, or as None (no mask at all)
            visible = torch.ones(2, 1, t + 1, dtype=torch.bool) if t % 2 else None
            steps.append(model.forward_cached(ids[:, t : t + 1], torch.full((2, 1), t), caches, t, visible))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_decoding_folds_kv_b_proj_only_where_the_folded_weights_stay_small():
    """The folded query and output weights hold (kv_lora_rank + rope) and kv_lora_rank numbers
    per head where the projections they replace hold (nope + rope) and v_head_dim, plus
    kv_b_proj: a latent much wider than the heads (as DeepSeek-V3's 512 against heads of 128)
    makes them larger than `MLA.FOLD_MAX_GROWTH` times those, and decoding then absorbs per step."""
    demo_like = make("q-lora", hidden_size=64, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=16)
    assert demo_like.layers[0].self_attn.folded() is not None
    wide_latent = make("q-lora", hidden_size=64, q_lora_rank=32, kv_lora_rank=64, qk_nope_head_dim=8, v_head_dim=8)
    assert wide_latent.layers[0].self_attn.folded() is None
    assert all(cache.folded is None for cache in wide_latent.new_caches(1, 4))
    ids = torch.randint(0, 97, (1, 12))
    with torch.inference_mode():
        torch.testing.assert_close(cached_logits(wide_latent, ids, None), wide_latent(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["plain-q", "q-lora"])
def test_folded_decoding_gives_the_logits_of_per_step_absorption(name, monkeypatch):
    """With weights large enough that each head attends sharply (at the default init the
    scores are near 0 and the attention near uniform, which would hide a wrong query)."""
    model = make(name, initializer_range=0.3).eval()
    ids = torch.randint(0, 97, (2, 24))
    with torch.inference_mode():
        folded = cached_logits(model, ids, None)
        monkeypatch.setattr(MLA, "FOLD_MAX_GROWTH", 0.0)
        per_step = cached_logits(model, ids, None)
        full = model(ids).logits
    torch.testing.assert_close(per_step, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(folded, per_step, atol=1e-4, rtol=1e-4)


def test_latent_cache_holds_only_the_latent():
    model = make("q-lora")
    c = model.config
    for dtype, size in [(None, 4), (torch.bfloat16, 2), (torch.float8_e4m3fn, 1)]:
        cache = model.new_caches(1, 8, dtype)[0]
        assert cache.bytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim) * size


def cached_logits(model, ids, dtype):
    """Logits of a 10-token prefill and then one token at a time, over a cache of `dtype`."""
    B, T = ids.shape
    caches = model.new_caches(B, T, dtype)
    slots = torch.arange(T)
    mask = (slots[:10, None] >= slots[None, :10]).expand(B, 10, 10)
    steps = [model.forward_cached(ids[:, :10], slots[:10].expand(B, 10), caches, 0, mask)]
    for t in range(10, T):
        steps.append(model.forward_cached(ids[:, t : t + 1], torch.full((B, 1), t), caches, t, None))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_narrower_cache_rounds_keys_and_values_but_stays_close(dtype):
    model = make("q-lora").eval()
    ids = torch.randint(0, 97, (2, 30))
    with torch.inference_mode():
        full = model(ids).logits
        exact = cached_logits(model, ids, None)
        narrow = cached_logits(model, ids, dtype)
    torch.testing.assert_close(exact, full, atol=1e-4, rtol=1e-4)
    assert (narrow - full).abs().max() > 1e-4  # the cache really holds the narrower numbers
    torch.testing.assert_close(narrow, full, atol=0.05, rtol=0)
    cache_dtypes = []
    new_caches = model.new_caches
    model.new_caches = lambda *args: cache_dtypes.append(args[2]) or new_caches(*args)
    assert len(generate(model, [[5, 6, 7]], max_new_tokens=6, cache_dtype=dtype)[0]) == 6
    assert cache_dtypes == [dtype]  # generation takes it too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_fp8_cache_widens_to_the_cast_values(dtype):
    model = make("plain-q")
    cache = model.new_caches(2, 6, torch.float8_e4m3fn)[0]
    values = torch.randn(cache.data.shape) * torch.logspace(-4, 3, cache.data.shape[-1])  # subnormal to saturated
    cache.write(0, *values.split([model.config.kv_lora_rank, model.config.qk_rope_head_dim], dim=-1))
    widened = cache.rows(1, 5, dtype)
    assert widened.dtype == dtype and torch.equal(widened, cache.data[:1, :5].to(dtype))


def test_an_fp8_cache_saturates_what_it_cannot_hold():
    model = make("plain-q")
    c = model.config
    cache = model.new_caches(1, 4, torch.float8_e4m3fn)[0]
    kv = torch.full((1, 2, c.kv_lora_rank), 1000.0)
    pe = torch.full((1, 2, c.qk_rope_head_dim), -1e6)
    cache.write(1, kv, pe)
    stored = cache.data.float()
    assert stored[0, 1:3, : c.kv_lora_rank].eq(448).all() and stored[0, 1:3, c.kv_lora_rank :].eq(-448).all()
    assert stored[0, [0, 3]].eq(0).all()  # other slots untouched


def test_batched_generation_with_left_padding_matches_single_prompts():
    model = make("grouped")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
    batched = generate(model, prompts, max_new_tokens=8)
    single = [generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert all(len(out) == 8 for out in batched)
    assert list(stream(model, prompts[0], max_new_tokens=8)) == single[0]


def test_compiled_decoding_matches_eager_decoding():
    """`compile=True` runs the steps after the prompt through torch.compile (inductor, the
    whole step as one graph): the same greedy tokens as eager decoding, for one prompt, for a
    left-padded batch and over an fp8 cache, and the same logits up to rounding."""
    from torch._dynamo.utils import counters

    model = make("grouped").eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, prompts[:1], max_new_tokens=8, compile=True) == generate(model, prompts[:1], 8)
    assert generate(model, prompts, max_new_tokens=8, compile=True) == generate(model, prompts, 8)
    fp8 = torch.float8_e4m3fn
    assert generate(model, prompts, 8, cache_dtype=fp8, compile=True) == generate(model, prompts, 8, cache_dtype=fp8)
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    ids = torch.randint(0, 97, (1, 20))
    with torch.inference_mode():
        logits = {}
        for name, step in ("eager", model.forward_cached), ("compiled", compiled_step(model)):
            caches = model.new_caches(1, 64)
            model.forward_cached(ids[:, :10], torch.arange(10)[None], caches, 0, None)
            logits[name] = torch.cat([step(ids[:, t : t + 1], torch.tensor([[t]]), caches, t, torch.ones(1, 1, t + 1,
                                                                                                   dtype=torch.bool))
                                      for t in range(10, 20)], dim=1)
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.get_default_device().type != "cpu", reason="a CPU's compiled decoding needs a C++ compiler")
def test_compiled_decoding_takes_batches_it_can_and_needs_a_compiler(monkeypatch):
    """Batches above `Experts.DECODE_ROWS` prompts decode eagerly even with compile=True, and
    without a C++ compiler a CPU refuses compiled decoding with a message (both checked with a
    stand-in for the compiled step, so nothing compiles here)."""
    from model import generate as generation
    from model.moe import Experts

    model = make()
    stepped = []
    monkeypatch.setattr(generation, "compiled_step", lambda net: stepped.append(net) or net.forward_cached)
    monkeypatch.setattr(generation, "cpp_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(Experts, "DECODE_ROWS", 2)
    generate(model, [[1, 2], [3, 4]], max_new_tokens=3, compile=True)
    generate(model, [[1, 2], [3, 4], [5, 6]], max_new_tokens=3, compile=True)
    assert stepped == [model]
    monkeypatch.setattr(generation, "cpp_compiler", lambda: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        generate(model, [[1, 2]], max_new_tokens=3, compile=True)


def test_generation_stops_and_samples_reproducibly():
    model = make()
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=6)[0]
    assert generate(model, [[1, 2, 3]], max_new_tokens=6, stop_ids=[greedy[2]])[0] == greedy[:2]
    a = generate(model, [[1, 2, 3]], max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    b = generate(model, [[1, 2, 3]], max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    assert a == b
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.0, -1.0]])
    for temperature in (1e-39, 1e-45, 1e-320):  # a temperature this small samples the most likely token
        assert sample_next(logits, temperature).tolist() == [1, 0]  # 1e-320 is 0 in fp32
    for top_p in (1e-30, 1e-46):  # the most likely token only (1e-46 is 0 in fp32)
        assert sample_next(logits, 1.0, top_p=top_p).tolist() == [1, 0]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1] * 60], max_new_tokens=10)
    for bad in (dict(max_new_tokens=-1), dict(temperature=-1.0), dict(temperature=float("inf")),
                dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="generation needs max_new_tokens >= 0"):
            generate(model, [[1, 2, 3]], **{"max_new_tokens": 4, **bad})


def test_bias_update_drives_max_violation_down():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, "bias_update_speed": 0.01, "seq_aux_loss_alpha": 0.0})
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.02)
    with torch.no_grad():
        moe.gate.weight[0] += 0.5  # expert 0 scores high for every token (x has a positive mean)
        moe.gate.weight[1] += 0.3
    x = torch.randn(4, 32, 32) + 0.5
    history = []
    for _ in range(150):
        with torch.no_grad():
            moe(x)
        history.append(moe.update_bias())
    assert history[0] > 1.0
    assert max(history[-10:]) < 0.35 * history[0]
    assert moe.gate.e_score_correction_bias[0] < 0  # the overloaded expert was pushed down


def test_bias_is_outside_autograd_and_only_selects():
    model = make("grouped").train()
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids[:, :-1], ids[:, 1:])
    (out.loss + out.mtp_loss + out.aux_loss).backward()
    for moe in model.moe_layers():
        assert not moe.gate.e_score_correction_bias.requires_grad
        assert moe.expert_load.sum() > 0


def test_sequence_balance_loss_is_optional():
    ids = torch.randint(0, 97, (2, 16))
    on = make(seq_aux_loss_alpha=0.01).train()(ids[:, :-1], ids[:, 1:]).aux_loss
    off = make(seq_aux_loss_alpha=0.0).train()(ids[:, :-1], ids[:, 1:]).aux_loss
    assert on > 0 and off == 0


def test_mtp_scores_position_t_against_token_t_plus_2():
    model = make().train()
    T, j = 16, 9
    ids = torch.randint(0, 97, (1, T + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    only_j = torch.full_like(targets, -100)
    only_j[0, j] = targets[0, j]  # token j+1
    head_inputs = []  # the outputs of the final norms, which the head multiplies
    hooks = [norm.register_forward_hook(lambda m, i, o: head_inputs.append(o))
             for norm in (model.norm, model.mtp[0].norm)]
    out = model(inputs, only_j)
    for hook in hooks:
        hook.remove()
    main_logits, mtp_logits = (model.lm_head(h) for h in head_inputs)
    assert main_logits.shape[0] == mtp_logits.shape[0] == 1  # each head ran on its one scored row
    # the MTP row scored (position j-1, as the causality check below shows) is scored against token (j-1)+2
    expected = torch.nn.functional.cross_entropy(mtp_logits, targets[0, j : j + 1])
    torch.testing.assert_close(out.mtp_loss, expected)
    # and the MTP prediction at position i sees token i+1 but nothing later
    changed = inputs.clone()
    changed[0, j] = (changed[0, j] + 1) % 97
    later = inputs.clone()
    later[0, j + 1] = (later[0, j + 1] + 1) % 97
    mtp_inputs = []
    hook = model.mtp[0].norm.register_forward_hook(lambda m, i, o: mtp_inputs.append(o))
    with torch.no_grad():
        for x in (inputs, changed, later):
            model(x, targets)
        hook.remove()
        base, seen, unseen = (model.lm_head(h) for h in mtp_inputs)  # MTP heads over all T-1 positions
    assert base.shape[0] == T - 1
    assert not torch.allclose(base[j - 1], seen[j - 1])
    torch.testing.assert_close(base[j - 1], unseen[j - 1], atol=1e-6, rtol=1e-5)


def test_parameter_counts_and_flops():
    model = make("grouped")
    counts = parameter_counts(model)
    c = model.config
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    assert counts["total"] - counts["activated"] == moe_layers * expert * (c.n_routed_experts - c.num_experts_per_tok)
    assert counts["total"] == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert flops_per_token(model, 32) > 6 * (counts["activated"] - c.vocab_size * c.hidden_size)
    # a step's FLOPs count the output head only at the positions with a target
    assert step_flops(model, 32, positions=64, scored=64) == 64 * flops_per_token(model, 32)
    head = 6 * c.vocab_size * c.hidden_size
    assert step_flops(model, 32, positions=64, scored=5) == 64 * flops_per_token(model, 32) - 59 * head


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"n_group": 3}, "n_group"),
        ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "topk_group"),
        ({"first_k_dense_replace": 7}, "first_k_dense_replace"),
        ({"first_k_dense_replace": 3, "num_nextn_predict_layers": 1, "num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"hidden_size": 36}, "hidden_size"),
        ({"moe_intermediate_size": 18}, "moe_intermediate_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
        ({"pad_token_id": 500}, "pad_token_id"),
        # transformers follows these and the model would not: the export would compute otherwise
        ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "truncate": False}},
         "rope_scaling"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": None}},
         "rope_scaling"),
        ({"n_routed_experts": 0, "first_k_dense_replace": 0, "intermediate_size": 0}, "intermediate_size"),
    ],
)
def test_impossible_configs_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"model.{field}="):
        ModelConfig(**{**BASE, **overrides})


def test_unknown_field_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean hidden_size"):
        ModelConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\): bogus; hiden_size \(did you mean hidden_size\?\)$"):
        ModelConfig.from_dict({"bogus": 1, "hiden_size": 64})  # no suggestion where nothing is close
