"""The quantization attack through bitsandbytes (robustness/bnb.py) and our NF4 against it: nf4-g64
bit for bit on every shape, the seed paper's load_in_4bit (FP4, no double quantization, bfloat16
compute) against a hand check of one block and of one layer's forward, which weights each loaded
scheme quantizes, and LLM.int8's weights."""

from __future__ import annotations

import sys

import bitsandbytes.functional as bnb
import pytest
import torch
from tiny import assert_unchanged, snapshot, tiny_gpt2, tiny_llama

from zounlearn.robustness import quantization_attack, quantize_model, quantize_nf4, target_weights
from zounlearn.robustness.bnb import LOADED_SCHEMES, load_quantized, quantize_4bit_weight
from zounlearn.robustness.quantize import DEFAULT_SCHEMES, check_scheme
from zounlearn.unlearning import Split, UnlearningData, load_examples, load_model

# bitsandbytes' FP4 (E2M1 with its subnormal 0.0625), in units of 1/12: its functional.py's table.
FP4_LEVELS = sorted({s * v / 12 for v in (0, 0.0625, 2, 3, 4, 6, 8, 12) for s in (1, -1)})


@pytest.mark.parametrize("shape", [(128, 64), (256, 192), (64, 1000), (37, 11), (3, 193), (1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_nf4_is_bitsandbytes_nf4_bit_for_bit(shape, dtype):
    """On shapes whose rows are not whole blocks too (64 x 1000: blocks cross rows), with an all-zero
    block, exact midpoints between levels and both weight layouts."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])).to(dtype)
    flat = weight.view(-1)
    flat[:64] = 0  # an all-zero block
    if flat.numel() >= 128:  # ties: exact midpoints of the levels in a block whose absmax is 1
        levels = torch.tensor(sorted(bnb.get_4bit_type("nf4", device="cpu").tolist()))
        flat[64:79] = ((levels[1:] + levels[:-1]) / 2).to(dtype)
        flat[79] = 1.0
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    theirs = bnb.dequantize_4bit(packed, state)
    assert torch.equal(quantize_nf4(weight), theirs)
    assert torch.equal(quantize_nf4(weight.T.contiguous(), channel_dim=1), theirs.T)


def _first_block_by_hand(weight: torch.Tensor) -> torch.Tensor:
    """FP4 of the first 64 elements of a weight: each / absmax, the nearest level, times absmax."""
    block = weight.reshape(-1)[:64].double()
    absmax = block.abs().max()
    levels = torch.tensor(FP4_LEVELS, dtype=torch.float64)
    nearest = levels[(block / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1)]
    return (nearest * absmax).float()


def test_seed_papers_4bit_attack_against_a_hand_check():
    """bnb-fp4 loads the model through BitsAndBytesConfig: FP4 in blocks of 64 without double
    quantization, bfloat16 compute. Its first layer's first block is the hand-computed FP4 of the
    weights, and the layer computes x and the dequantized weight in bfloat16."""
    model = tiny_gpt2(seed=3)
    before = snapshot(model)
    loaded = load_quantized(model, "bnb-fp4")
    assert_unchanged(model, before)
    layer = loaded.transformer.h[0].attn.c_attn
    state = layer.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested, layer.compute_dtype) == \
        ("fp4", 64, False, torch.bfloat16)
    original = model.transformer.h[0].attn.c_attn.weight.detach().T  # Conv1D (in, out) as Linear's (out, in)
    dequantized = bnb.dequantize_4bit(layer.weight.data, state)
    assert torch.equal(dequantized.reshape(-1)[:64], _first_block_by_hand(original))
    assert not torch.equal(dequantized, original)
    x = torch.randn(2, 3, original.shape[1], generator=torch.Generator().manual_seed(0))
    by_hand = torch.nn.functional.linear(x.bfloat16(), dequantized.bfloat16(), layer.bias.bfloat16()).float()
    assert torch.equal(layer(x), by_hand)


@pytest.mark.parametrize("scheme", list(LOADED_SCHEMES))
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_loaded_schemes_quantize_the_target_weights_with_bitsandbytes_own_functions(build, scheme):
    """Every target weight (targets.py) and nothing else becomes a bitsandbytes layer whose weight is
    what bitsandbytes.functional makes of the original; the rest of the model is the original."""
    model = build()
    loaded = quantize_model(model, scheme)
    layers = {f"{name}.weight": module for name, module in loaded.named_modules()
              if type(module).__name__ in ("Linear4bit", "Linear8bitLt")}
    targets = {t.name: t for t in target_weights(model)}
    assert layers.keys() == targets.keys()
    for name, target in targets.items():
        matrix = target.weight.detach().movedim(target.channel_dim, 0).contiguous()
        weight = layers[name].weight
        if scheme == "bnb-int8":  # LLM.int8: each row's absmax scale, from float16
            codes, scales, _ = bnb.int8_vectorwise_quant(matrix.half())
            assert torch.equal(weight.data, codes) and torch.equal(weight.SCB, scales), name
        else:
            kind = LOADED_SCHEMES[scheme]["bnb_4bit_quant_type"]
            expected = quantize_4bit_weight(target.weight, target.channel_dim, kind).movedim(target.channel_dim, 0)
            assert torch.equal(bnb.dequantize_4bit(weight.data, weight.quant_state), expected), name
    theirs = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        if name not in targets and name in theirs:
            assert torch.equal(theirs[name], p), name


def test_functional_fp4_scheme_and_the_attack_run_on_the_cpu():
    model = tiny_gpt2()
    quantized = quantize_model(model, "fp4-g64")
    for target, ours in zip(target_weights(model), target_weights(quantized)):
        assert torch.equal(ours.weight, quantize_4bit_weight(target.weight, target.channel_dim, "fp4"))
    assert "bnb-fp4" in DEFAULT_SCHEMES


def test_quantization_attack_evaluates_the_loaded_model(small_files):
    model, tokenizer = load_model(small_files["model"])
    qa = [e for path in small_files["forget"] for e in load_examples(path) if e.kind == "qa"][:4]
    data = UnlearningData(Split("forget", train=tuple(qa), qa=tuple(qa)), Split("retain", train=tuple(qa)))
    result = quantization_attack(model, tokenizer, data, schemes=("bnb-fp4", "bnb-int8"))
    assert list(result) == ["bnb-fp4", "bnb-int8"]
    assert all(0 < m["forget/loss"] < 100 for m in result.values())


def test_without_bitsandbytes_the_schemes_say_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    for scheme in ("bnb-fp4", "fp4-g64"):
        with pytest.raises(ValueError, match=r"cannot run: bitsandbytes is not installed.*nf4-g64"):
            check_scheme(scheme)
