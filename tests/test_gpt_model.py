"""The example GPT model and its EMA: small configs, CPU, a few seconds in all."""

import io
import math

import pytest
import torch

from examples.gpt.model import EMA, GPT, GPTConfig

SMALL = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)


def make(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides}))


def batch(b=3, t=16, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("vocab_size", 0, "vocab_size must be a positive int"),
        ("block_size", -1, "block_size must be a positive int"),
        ("n_layer", 1.5, "n_layer must be a positive int"),
        ("n_head", True, "n_head must be a positive int"),
        ("n_embd", 31, "n_embd must be a multiple of n_head"),
        ("dropout", 1.0, "dropout must be in [0, 1)"),
        ("dropout", -0.1, "dropout must be in [0, 1)"),
        ("bias", "yes", "bias must be true or false"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, fragment):
    with pytest.raises(ValueError) as err:
        GPTConfig(**{**SMALL, field: value})
    assert fragment in str(err.value)
    assert str(err.value).startswith("[model] ")


def test_config_is_frozen():
    cfg = GPTConfig(**SMALL)
    with pytest.raises(AttributeError):
        cfg.n_layer = 3


# ------------------------------------------------------------------ forward


def test_forward_shapes_and_loss_near_log_vocab_at_init():
    model = make(vocab_size=512)
    x, y = batch(b=4, t=16, vocab=512)
    logits, loss = model(x, y)
    assert logits.shape == (4, 16, 512)
    # Small init => nearly uniform predictions => cross-entropy ~ ln(vocab).
    assert abs(loss.item() - math.log(512)) < 0.15
    logits2, no_loss = model(x)
    assert no_loss is None and logits2.shape == (4, 16, 512)


def test_shorter_sequences_work_and_too_long_is_a_clear_error():
    model = make()
    logits, _ = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 97)
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets shape \(1, 4\) must equal idx shape \(1, 5\)"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_attention_is_causal():
    model = make().eval()
    x, _ = batch(b=1, t=10)
    changed = x.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 97
    a, _ = model(x)
    b, _ = model(changed)
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_weight_tying_and_num_params():
    model = make()
    assert model.lm_head.weight is model.wte.weight
    cfg = model.config
    per_block = 2 * cfg.n_embd + (3 + 1 + 4 + 4) * cfg.n_embd**2  # 2 LayerNorms (no bias) + matrices
    expected = cfg.vocab_size * cfg.n_embd + cfg.n_layer * per_block + cfg.n_embd  # + ln_f
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + cfg.block_size * cfg.n_embd


def test_dropout_is_on_in_train_mode_and_off_in_eval():
    model = make(dropout=0.2)
    x, y = batch()
    model.train()
    _, l1 = model(x, y)
    _, l2 = model(x, y)
    assert l1.item() != l2.item()  # different dropout masks
    # Dropout draws from the global RNG: restoring it repeats the masks (exact resume).
    torch.manual_seed(123)
    _, a = model(x, y)
    torch.manual_seed(123)
    _, b = model(x, y)
    assert a.item() == b.item()
    model.eval()
    assert model(x, y)[1].item() == model(x, y)[1].item()


def test_no_dropout_config_is_deterministic_in_train_mode():
    model = make(dropout=0.0).train()
    x, y = batch()
    assert model(x, y)[1].item() == model(x, y)[1].item()


def test_a_few_steps_fit_one_batch():
    model = make()
    opt = model.configure_optimizer(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.95))
    x, y = batch()
    first = model(x, y)[1].item()
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


# ------------------------------------------------------------------ optimizer


def test_configure_optimizer_groups():
    model = make(bias=True)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # the tied weight is listed once
    assert set(ids) == {id(p) for p in model.parameters()}
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(weight_decay=-1, lr=1e-3, betas=(0.9, 0.95)), "weight_decay must be >= 0"),
        (dict(weight_decay=0.1, lr=0, betas=(0.9, 0.95)), "lr must be > 0"),
        (dict(weight_decay=0.1, lr=1e-3, betas=(0.9, 1.0)), "betas must be two numbers"),
    ],
)
def test_configure_optimizer_rejects_bad_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        make().configure_optimizer(**kwargs)


# ------------------------------------------------------------------ generate


def test_generate_is_deterministic_given_a_generator_and_restores_mode():
    model = make(dropout=0.3).train()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 25, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    torch.rand(5)  # global RNG use in between must not matter
    b = model.generate(prompt, 25, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    c = model.generate(prompt, 25, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(8))
    assert a.shape == (1, 28) and torch.equal(a[:, :3], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert model.training  # back in train mode


def test_generate_greedy_and_top1_agree_and_crop_to_block_size():
    model = make()
    prompt = torch.randint(0, 97, (2, 20))  # longer than block_size: cropped context
    greedy = model.generate(prompt, 5, temperature=0)
    top1 = model.generate(prompt, 5, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)
    expected_next = model.eval()(prompt[:, -16:])[0][:, -1].argmax(-1)
    assert torch.equal(greedy[:, 20], expected_next)


def test_generate_rejects_bad_sampling_settings():
    model = make()
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, temperature=-1)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 97\]"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, top_k=0)


# ------------------------------------------------------------------ EMA


def test_ema_update_math_without_warmup():
    model = make()
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        assert torch.allclose(ema.shadow[n], 0.9 * p0[n] + 0.1 * (p0[n] + 1.0), atol=1e-6)
    ema.update(model)  # same weights again: 0.9 * (p0 + 0.1) + 0.1 * (p0 + 1)
    for n in p0:
        assert torch.allclose(ema.shadow[n], p0[n] + 0.19, atol=1e-6)
    assert ema.num_updates == 2


def test_ema_warmup_schedule():
    ema = EMA(make(), decay=0.999, warmup=True)
    seen = []
    for _ in range(3):
        seen.append(ema.current_decay())
        ema.num_updates += 1
    assert seen == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 100_000
    assert ema.current_decay() == 0.999


def test_ema_average_parameters_swaps_and_restores_and_copy_to():
    model = make()
    ema = EMA(model, decay=0.5, warmup=False)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update(model)  # shadow = 2 * original
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.average_parameters(model) as m:
        assert m is model
        for n, p in model.named_parameters():
            assert torch.allclose(p, 2 * original[n])
        assert model.lm_head.weight is model.wte.weight  # tying survives the swap
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n])
    ema.copy_to(model)
    for n, p in model.named_parameters():
        assert torch.allclose(p, 2 * original[n])


def test_ema_state_dict_round_trip_through_torch_save():
    model = make()
    ema = EMA(model, decay=0.8, warmup=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMA(make(), decay=0.1, warmup=False)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert (other.decay, other.warmup, other.num_updates) == (0.8, True, 1)
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])


def test_ema_mismatched_model_and_state_are_clear_errors():
    ema = EMA(make())
    with pytest.raises(ValueError, match="unwrap_model"):
        ema.update(make(n_layer=3))
    with pytest.raises(ValueError, match="same model config"):
        ema.load_state_dict(EMA(make(n_layer=3)).state_dict())
    with pytest.raises(ValueError, match="same model config"):
        ema.load_state_dict(EMA(make(n_embd=64)).state_dict())
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMA(make(), decay=1.0)
