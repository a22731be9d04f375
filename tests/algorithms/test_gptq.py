"""GPTQ (Frantar et al. 2022) on a small Llama-style decoder trained on real text, on GPT-2's
Conv1D, and on bad input.

The decoder (conftest `trained_llama`) is 128 wide, so int4 uses g=128 (one group per row of the
hidden-size inputs, three along the MLP's 384 inputs) and int3 g=64 (two / six groups)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import quanta
from quanta.algorithms import GPTQOptions, gptq
from quanta.algorithms.gptq_solver import SolverError, inverse_cholesky, solve
from quanta.core.packing import unpack_bits
from quanta.core.quantize import quantize as quantize_codes
from quanta.integer.weight_only import Int4WeightOnlyLinear
from quanta.nn import QuantDescriptor

transformers = pytest.importorskip("transformers")
from decoder_lm import perplexity, windows


def _weight_only(bits: int, group_size: int) -> quanta.QuantConfig:
    config = quanta.preset("weight_only_int4", group_size=group_size)
    weight = QuantDescriptor(num_bits=bits, group_size=group_size, symmetric=False)
    return dataclasses.replace(config, default=dataclasses.replace(config.default, weight=weight))


@pytest.fixture(scope="module")
def calib(lm_calib_windows):
    return list(lm_calib_windows[:64].split(16))  # 64 windows of 64 bytes, 4 batches


@pytest.fixture(scope="module")
def fp32_ppl(trained_llama, lm_eval_windows):
    return perplexity(trained_llama, lm_eval_windows)


def _quantized(model, config, calib, options):
    rtn = quanta.prepare(model, config)
    sim = quanta.prepare(model, config)
    record = gptq(sim, calib, options, progress=False)
    return rtn, sim, record


@pytest.fixture(scope="module")
def int4(trained_llama, calib):
    return _quantized(trained_llama, _weight_only(4, 128), calib, GPTQOptions())


@pytest.fixture(scope="module")
def int3_act_order(trained_llama, calib):
    return _quantized(trained_llama, _weight_only(3, 64), calib, GPTQOptions(act_order=True))


def _logit_mse(model, reference, tokens) -> float:
    with torch.no_grad():
        return float((model(input_ids=tokens).logits - reference(input_ids=tokens).logits).pow(2).mean())


def test_trained_decoder_lm_is_far_below_uniform(fp32_ppl):
    assert fp32_ppl < 20  # measured 11.6; uniform guessing: 256


@pytest.mark.parametrize("which", ["int4", "int3_act_order"])
def test_gptq_beats_round_to_nearest_in_perplexity_and_layer_error(which, request, trained_llama, lm_eval_windows,
                                                                    fp32_ppl):
    rtn, sim, record = request.getfixturevalue(which)
    assert not record["skipped"]
    assert len(record["layers"]) == 15  # 7 per decoder layer (q k v o gate up down) and the lm_head
    # one pass over the data per group of layers fed the same tensor: (q k v) o (gate up) down per layer, lm_head
    assert [len(g) for g in record["groups"]] == [3, 1, 2, 1] * 2 + [1]
    assert record["groups"][0] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    # every layer's output error on the calibration inputs (from H) drops; measured 20x (int4) / 40x (int3)
    assert all(r["error_gptq"] < r["error_nearest"] for r in record["layers"])
    assert sum(r["error_gptq"] for r in record["layers"]) < 0.25 * sum(r["error_nearest"] for r in record["layers"])
    # held out: logits closer to fp32 and perplexity within half of round-to-nearest's loss
    eval_tokens = lm_eval_windows[:16]
    assert _logit_mse(sim, trained_llama, eval_tokens) < _logit_mse(rtn, trained_llama, eval_tokens)
    ppl_rtn, ppl_gptq = perplexity(rtn, lm_eval_windows), perplexity(sim, lm_eval_windows)
    # measured int4 g128: fp32 11.624, RTN 11.695, GPTQ 11.617; int3 g64 act-order: RTN 11.724, GPTQ 11.624
    assert ppl_gptq - fp32_ppl < 0.5 * (ppl_rtn - fp32_ppl)


def test_int3_loses_more_than_int4_to_round_to_nearest(int4, int3_act_order, lm_eval_windows, fp32_ppl):
    assert perplexity(int3_act_order[0], lm_eval_windows) > perplexity(int4[0], lm_eval_windows) > fp32_ppl


def test_act_order_keeps_each_groups_scales_from_the_original_weight(trained_llama, int3_act_order):
    rtn, sim, record = int3_act_order
    assert record["options"]["act_order"] and not any(r["dynamic_groups"] for r in record["layers"])
    for name in ("model.layers.0.mlp.down_proj", "lm_head"):
        w_float = trained_llama.get_submodule(name).weight
        expected = rtn.get_submodule(name).weight_quantizer.qparams(w_float)
        frozen = sim.get_submodule(name).weight_quantizer.qparams()  # frozen: no tensor needed
        assert all(torch.equal(a, b) for a, b in zip(frozen, expected))


def _unpacked(mod: Int4WeightOnlyLinear) -> torch.Tensor:
    return unpack_bits(mod.weight, 4, mod.signed, length=mod.in_features).float()


def test_the_integer_kernels_run_gptqs_codes_and_round_trip_the_file(int4, trained_llama, lm_eval_windows, tmp_path):
    rtn, sim, record = int4
    q = quanta.convert(copy.deepcopy(sim))
    for row in record["layers"]:
        name = row["layer"]
        mod, simulated = q.get_submodule(name), sim.get_submodule(name)
        assert isinstance(mod, Int4WeightOnlyLinear)
        codes = _unpacked(mod)
        zp = mod.weight_zero_point.float().repeat_interleave(mod.group_size, 1)
        scale = mod.weight_scale.repeat_interleave(mod.group_size, 1)
        # the simulated weight is exactly (codes - zp) * scale: the kernel holds GPTQ's codes, not a re-rounding
        assert torch.equal((codes - zp) * scale, simulated.weight.detach())
        # and they differ from round-to-nearest of the float weight exactly where GPTQ said
        w_float = trained_llama.get_submodule(name).weight.detach()
        wq = rtn.get_submodule(name).weight_quantizer
        nearest = quantize_codes(w_float, *wq.qparams(w_float), wq.spec).float()
        assert int((codes != nearest).sum()) == row["codes_changed"] > 0
    prompt = lm_eval_windows[:1, :12]
    with torch.no_grad():
        ref = q(input_ids=lm_eval_windows[:4]).logits
        tokens = q.generate(prompt, max_new_tokens=6, do_sample=False)
    quanta.save(q, tmp_path / "llama_gptq.safetensors")
    from decoder_lm import build_llama

    loaded = quanta.load(tmp_path / "llama_gptq.safetensors", build_llama(seed=1).eval())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=lm_eval_windows[:4]).logits, ref)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), tokens)
    assert tokens.shape == (1, 18)


def test_gpt2_conv1d_layers_get_gptq_codes_and_the_tied_head_stays_tied(lm_text):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = list(windows(lm_text.train, 32, 32, seed=2).split(8))
    q = quanta.quantize(model, "weight_only_int4", group_size=32, calib_data=data, algorithms=["gptq"],
                        speed_check=False, progress=False)
    record = next(r for r in q._quanta_algorithms if r["algorithm"] == "gptq")
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert sorted(r["layer"] for r in record["layers"]) == sorted(conv1d)
    assert all(r["error_gptq"] < r["error_nearest"] for r in record["layers"])
    assert [s["layer"] for s in record["skipped"]] == ["lm_head"] and "tied" in record["skipped"][0]["reason"]
    assert torch.equal(q.transformer.wte.weight, before["transformer.wte.weight"])  # the embedding unchanged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched
    # the Conv1D's GPTQ codes reach the Linear kernel (its frozen ranges carried onto the transposed weight)
    sim = quanta.prepare(model, quanta.preset("weight_only_int4", group_size=32))
    assert gptq(sim, data, progress=False)["layers"] == record["layers"]
    assert sim.lm_head.weight is sim.transformer.wte.weight  # still tied, and still the float embedding
    assert torch.equal(sim.lm_head.weight, before["transformer.wte.weight"])
    converted = quanta.convert(copy.deepcopy(sim))
    tokens = data[0][:2]
    for name in conv1d:
        mod, simulated = converted.get_submodule(name), sim.get_submodule(name)
        scale = mod.weight_scale.repeat_interleave(32, 1)
        zp = mod.weight_zero_point.float().repeat_interleave(32, 1)
        assert torch.equal((_unpacked(mod) - zp) * scale, simulated.weight.detach().t())
    with torch.no_grad():
        assert torch.equal(q(tokens).logits, converted(tokens).logits)
        torch.testing.assert_close(q(tokens).logits, sim(tokens).logits, atol=2e-2, rtol=0)


class _DeadBranch(nn.Module):
    """A model whose second Linear only ever sees zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.dead, self.b = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h + self.dead(h * 0))


def test_all_zero_inputs_and_unfitting_groups_are_skipped_and_reported_unchanged():
    torch.manual_seed(0)
    model = _DeadBranch().eval()
    sim = quanta.prepare(model, quanta.preset("weight_only_int4", group_size=32))
    dead_weight = sim.dead.weight.detach().clone()
    record = gptq(sim, [torch.randn(16, 32) for _ in range(4)], progress=False)
    assert record["skipped"] == [{"layer": "dead", "reason": "its inputs are all zero on the calibration data"}]
    assert [r["layer"] for r in record["layers"]] == ["a", "b"]
    assert torch.equal(sim.dead.weight, dead_weight) and sim.dead.weight_quantizer.amax is None  # not frozen
    # a layer whose inputs the group size cannot split stays float, says so, and GPTQ leaves it alone
    odd = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 8)).eval()
    with pytest.warns(UserWarning, match="group_size 64 does not divide"):
        q = quanta.quantize(odd, "weight_only_int4", group_size=64, calib_data=[torch.randn(16, 64)],
                            algorithms=["gptq"], algorithm_options={"gptq": {"min_samples": 16}},
                            speed_check=False, progress=False)
    assert type(q[2]) is nn.Linear and torch.equal(q[2].weight, odd[2].weight)
    assert "group_size 64 does not divide" in {r.name: r for r in quanta.conversion_report(q)}["2"].detail
    assert [r["layer"] for r in q._quanta_algorithms[0]["layers"]] == ["0"]


def test_too_little_calibration_data_says_how_much_is_needed(trained_llama, calib):
    before = {k: v.clone() for k, v in trained_llama.state_dict().items()}
    with pytest.raises(ValueError, match="at least 32 calibration samples, got 8"):
        quanta.quantize(trained_llama, "weight_only_int4", group_size=128, calib_data=[calib[0][:8]],
                        algorithms=["gptq"], speed_check=False, progress=False)
    sim = quanta.prepare(trained_llama, _weight_only(4, 128))
    with pytest.raises(ValueError, match="at least 100 calibration samples, got 64"):
        gptq(sim, calib, GPTQOptions(min_samples=100), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in trained_llama.state_dict().items())
    assert all(m.weight_quantizer.amax is None for m in sim.modules() if hasattr(m, "weight_quantizer"))


def test_options_and_inputs_are_validated():
    for bad in ({"blocksize": 0}, {"percdamp": 0.0}, {"percdamp": 2}, {"act_order": "yes"}, {"min_samples": -1},
                {"damp_retries": 1.5}):
        with pytest.raises(ValueError, match=f"GPTQOptions.{next(iter(bad))}"):
            GPTQOptions(**bad)
    with pytest.raises(ValueError, match="unknown option"):
        quanta.preset("weight_only_int4", algorithms=["gptq"], algorithm_options={"gptq": {"block": 64}})
    with pytest.raises(ValueError, match="choose one of 'adaround' and 'gptq'"):
        quanta.preset("weight_only_int4", algorithms=["adaround", "gptq"])
    with pytest.raises(ValueError, match="prepare it first"):
        gptq(nn.Sequential(nn.Linear(8, 8)), [torch.randn(64, 8)], progress=False)
    with pytest.raises(TypeError, match="GPTQOptions"):
        gptq(nn.Sequential(nn.Linear(8, 8)), [torch.randn(64, 8)], {"blocksize": 8}, progress=False)


def _reference_gptq(w, h, scale, zero, qmin, qmax, blocksize, percdamp=0.01):
    """The paper's reference loop (IST-DASLab/gptq `fasterquant`, per-channel grid, no groups)."""
    w, h = w.clone(), h.clone().float()
    cols = w.shape[1]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = scale * (torch.clamp(torch.round(w1[:, i] / scale) + zero, qmin, qmax) - zero)
            out[:, i1 + i] = q
            err1[:, i] = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err1[:, i:i + 1] @ hinv1[i:i + 1, i:]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out


def test_solver_equals_the_reference_loop_and_keeps_dead_inputs_at_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g) @ torch.randn(12, 90, generator=g) + 0.1 * torch.randn(500, 90, generator=g)
    x[:, 7] = 0  # a dead input
    w = torch.randn(24, 90, generator=g)
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    scale, zero = (hi - lo) / 15, torch.round(-lo / ((hi - lo) / 15))
    h = (x.t() @ x).double()
    sol = solve(w, h, qmin=0, qmax=15, scale=scale[:, None], zero_point=zero[:, None], blocksize=32)
    ours = (sol.codes - sol.zero_point) * sol.scale
    h_ref = h.clone()
    h_ref[7, 7] = 1.0
    torch.testing.assert_close(ours, _reference_gptq(w, h_ref, scale, zero, 0, 15, 32), atol=1e-5, rtol=0)
    nearest = torch.clamp(torch.round(w[:, 7] / scale) + zero, 0, 15)
    assert sol.dead == 1 and torch.equal(sol.codes[:, 7], nearest)


def test_an_indefinite_hessian_gets_more_damping_or_a_clear_error():
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64)  # eigenvalues 4 and -2
    upper, damp = inverse_cholesky(h, 0.01, retries=4)  # λ = 0.01, 0.1, 1 fail; 10 succeeds
    assert damp == pytest.approx(10.0) and torch.isfinite(upper).all()
    with pytest.raises(SolverError, match="not positive definite"):
        inverse_cholesky(h, 0.01, retries=2)


def _symmetric_int4_g32() -> quanta.QuantConfig:
    config = quanta.preset("weight_only_int4", group_size=32)
    weight = QuantDescriptor(num_bits=4, group_size=32, symmetric=True)
    return dataclasses.replace(config, default=dataclasses.replace(config.default, weight=weight))


@pytest.mark.parametrize("config", ["w4a8", "dynamic_int8", "symmetric_int4_g32"])
def test_per_channel_and_symmetric_grids_convert_to_the_simulated_model(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    x = torch.randn(256, 8) @ torch.randn(8, 64)  # correlated inputs: GPTQ has room to work
    config_ = _symmetric_int4_g32() if config == "symmetric_int4_g32" else quanta.preset(config)
    sim, rtn = quanta.prepare(model, config_), quanta.prepare(model, config_)
    record = gptq(sim, list(x.split(32)), progress=False)
    assert [r["layer"] for r in record["layers"]] == ["0", "2"] and not record["skipped"]
    assert all(r["error_gptq"] < 0.5 * r["error_nearest"] for r in record["layers"])  # measured 8-16x
    assert all(r["dynamic_groups"] == (config == "symmetric_int4_g32") for r in record["layers"])
    # the recorded errors are the mean ‖ΔW x‖² over the layer's (input-quantized) calibration inputs
    with torch.no_grad():
        xq = sim[0].input_quantizer(x).double()
        for key, w in (("error_gptq", sim[0].weight), ("error_nearest", rtn[0].weight_quantizer(model[0].weight))):
            direct = float((xq @ (w - model[0].weight).double().t()).pow(2).sum(1).mean())
            assert record["layers"][0][key] == pytest.approx(direct, rel=1e-4)
    q = quanta.convert(copy.deepcopy(sim))
    with torch.no_grad():
        if config == "symmetric_int4_g32":  # the same codes; bfloat16 activations: close
            assert q[0].weight_zero_point is None
            scale = q[0].weight_scale.repeat_interleave(32, 1)
            assert torch.equal(_unpacked(q[0]) * scale, sim[0].weight.detach())
            torch.testing.assert_close(q(x[:8]), sim(x[:8]), atol=2e-2, rtol=0)
        else:
            torch.testing.assert_close(q(x[:8]), sim(x[:8]), atol=1e-5, rtol=0)
