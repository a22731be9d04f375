"""AWQ on the trained decoder LM (`decoder_lm.py`, session fixtures in conftest.py): weight-only int4
(group 128) against round-to-nearest, on the model with salient activation channels planted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.algorithms import ALGORITHMS_ATTR, awq

transformers = pytest.importorskip("transformers")
from decoder_lm import perplexity
from test_smoothquant import plant_outliers, sqnr

#: salient channels: activations 30× larger there, the weight columns reading them 30× smaller
SALIENT_FACTOR = 30.0
#: the Linears AWQ scales whose outputs it leaves in their own units (v_proj and up_proj are also the
#: source of a pair, v_proj → o_proj and up_proj → down_proj, so their outputs are rescaled by design)
SCALED_LAYERS = [f"model.layers.{i}.{n}" for i in range(2) for n in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def salient(trained_llama) -> nn.Module:
    return plant_outliers(trained_llama, SALIENT_FACTOR)


@pytest.fixture(scope="module")
def calib(lm_calib_windows) -> list[torch.Tensor]:
    return list(lm_calib_windows[:32].split(8))


@pytest.fixture(scope="module")
def rtn_and_awq(salient, calib):
    config = quanta.preset("weight_only_int4", group_size=128)
    rtn = quanta.quantize(salient, config, calib_data=calib, speed_check=False, progress=False)
    with_awq = quanta.quantize(salient, config.extended(algorithms=["awq"]), calib_data=calib, speed_check=False,
                               progress=False)
    return rtn, with_awq


@torch.no_grad()
def _layer_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: seen.__setitem__(n, out.float())) for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_awq_int4_beats_round_to_nearest_in_perplexity_and_logits(salient, rtn_and_awq, lm_eval_windows):
    rtn, with_awq = rtn_and_awq
    x = lm_eval_windows[:16]
    with torch.no_grad():
        ref = salient(x).logits
        s_rtn, s_awq = sqnr(ref, rtn(x).logits), sqnr(ref, with_awq(x).logits)
    assert s_awq > s_rtn + 3, (s_rtn, s_awq)  # measured 31.6 -> 36.7 dB
    ppl_float, ppl_rtn, ppl_awq = (perplexity(m, lm_eval_windows) for m in (salient, rtn, with_awq))
    # measured: float 11.624, RTN 11.711, AWQ 11.672 (the loss to float nearly halved)
    assert ppl_awq < ppl_rtn - 0.02 and ppl_awq > ppl_float - 0.02, (ppl_float, ppl_rtn, ppl_awq)
    record = getattr(with_awq, ALGORITHMS_ATTR)[0]
    assert record["algorithm"] == "awq"
    scaled = {r["source"]: r for r in record["groups"] if r["scaled"]}
    assert {f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")} <= set(scaled)
    assert all(r["error_after"] < r["error_before"] for r in scaled.values())


def test_awq_lowers_the_output_error_of_the_layers_it_scales(salient, rtn_and_awq, lm_eval_windows):
    rtn, with_awq = rtn_and_awq
    x = lm_eval_windows[16:32]  # held out: not the rows AWQ scored its scales on
    ref = _layer_outputs(salient, SCALED_LAYERS, x)
    err = {name: {n: float((o - ref[n]).pow(2).sum() / ref[n].pow(2).sum()) for n, o in
                  _layer_outputs(model, SCALED_LAYERS, x).items()} for name, model in (("rtn", rtn), ("awq", with_awq))}
    better = [n for n in SCALED_LAYERS if err["awq"][n] < err["rtn"][n]]
    assert len(better) == len(SCALED_LAYERS), err
    assert sum(err["awq"].values()) < 0.3 * sum(err["rtn"].values()), err  # measured 0.14x (5x-11x per layer)


def test_awq_model_round_trips_through_save_and_load(salient, rtn_and_awq, lm_eval_windows, tmp_path, trained_llama):
    _, with_awq = rtn_and_awq
    quanta.save(with_awq, tmp_path / "awq.safetensors")
    fresh = plant_outliers(trained_llama, SALIENT_FACTOR)
    loaded = quanta.load(tmp_path / "awq.safetensors", fresh)
    x = lm_eval_windows[:4]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, with_awq(x).logits)
    assert [r["algorithm"] for r in getattr(loaded, ALGORITHMS_ATTR)] == ["awq"]


def test_awq_function_keeps_the_float_model(salient, calib, lm_eval_windows):
    import copy

    model = copy.deepcopy(salient)
    record = awq(model, calib, quanta.preset("weight_only_int4", group_size=128), grid=10)
    assert sum(r["scaled"] for r in record["groups"]) >= 4
    with torch.no_grad():
        torch.testing.assert_close(model(lm_eval_windows[:8]).logits, salient(lm_eval_windows[:8]).logits,
                                   rtol=1e-4, atol=1e-4)
