"""Weights in memory as int4 / int8 (server/model/quantize.py): the int4 grid read from Q4 GGUF blocks,
the quantized linears against a matmul with their own dequantised weights, the loader, and (slow) top-1
agreement with the float model on SmolLM2.

Tolerances: the int4 and int8 kernels take bf16 activations (8 significant bits), so a quantized
linear equals x_bf16 @ W_deq.T up to fp32 summation order, and x @ W_deq.T up to the rounding of x:
relative 2^-8 per element, about 2^-8 * sqrt(K) / sqrt(K) ~ 1% of the output's scale in the worst
case; 2% of the output's RMS is asserted. The fp16 LM head rounds only the weights (2^-11 relative).
"""
import pytest
import torch

from server.model.gguf_reader import GGUFFile, gguf_tensor_name, read_config
from server.model.loader import load_model
from server.model.quantize import Fp16Linear, Int4Codes, Int4Linear, Int8Linear, is_quantized


def rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_codes_from_gguf_blocks_are_the_files_own_values(tiny_gguf, qtype):
    """Every Q4 tensor's codes dequantise to exactly what the reader dequantises, Q/K rows un-permuted."""
    tiny = tiny_gguf(qtype, tied=True)
    f = GGUFFile(tiny.path)
    hf = read_config(f)
    names = [gguf_tensor_name(f"model.layers.0.{p}.weight") for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                                        "self_attn.v_proj", "mlp.down_proj")]
    for name in names:
        codes = f.int4_codes(name, hf)
        assert codes is not None, name
        assert int(codes.q.min()) >= 0 and int(codes.q.max()) <= 15
        assert torch.allclose(codes.dequantize(), f.tensor(name, hf), atol=1e-6, rtol=0), name


def test_quantized_linears_equal_their_dequantised_matmul():
    torch.manual_seed(0)
    weight, x = torch.randn(64, 96), torch.randn(5, 96)
    codes = Int4Codes.from_float(weight)
    assert (codes.dequantize() - weight).abs().max() <= (weight.abs().max() * 2 / 15) + 1e-6  # one grid step
    cases = [(Int4Linear(codes), codes.dequantize()), (Fp16Linear(weight), weight.half().float())]
    int8 = Int8Linear(weight)
    cases.append((int8, int8.qweight.float() * int8.scales.float()[:, None]))
    for module, dequantised in cases:
        expected = x @ dequantised.T
        got = module(x)
        assert got.shape == expected.shape and got.dtype == x.dtype
        assert rms(got - expected) <= 0.02 * rms(expected), type(module).__name__


def test_int4_load_of_a_gguf_holds_no_float_projection_and_stays_close(tiny_gguf):
    tiny = tiny_gguf("Q4_1", tied=True)
    exact = load_model(str(tiny.path))
    quantized = load_model(str(tiny.path), quantization="int4")
    assert is_quantized(quantized.model) and not is_quantized(exact.model)
    assert quantized.fingerprint == exact.fingerprint  # the same checkpoint, whatever it is served as
    big = [n for n, t in list(quantized.model.named_parameters()) + list(quantized.model.named_buffers())
           if t.dtype == torch.float32 and t.dim() == 2]
    assert big == [], big  # projections are packed int4, the head and embedding fp16
    ids = torch.tensor([[5, 17, 3, 40, 8, 21, 9, 2]])
    with torch.no_grad():
        a, b = exact.model.forward(ids), quantized.model.forward(ids)
    # the same int4 grid on both sides; only bf16 activations and the fp16 head differ
    assert rms(a - b) <= 0.05 * rms(a)


def test_bad_quantization_requests_are_clear_errors(tiny_gguf):
    tiny = tiny_gguf("F32")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        load_model(str(tiny.path), quantization="int3")
    with pytest.raises(ValueError, match="CPU only"):
        load_model(str(tiny.path), device="cuda", quantization="int4")


def top1_agreement(smollm2, mode: str) -> float:
    """Teacher-forced top-1 agreement with the fp32 model over every position of 64-token chat prompts."""
    quantized = load_model(str(smollm2.path), quantization=mode)
    tokenizer = smollm2.tokenizer
    questions = ["Explain photosynthesis to a child.", "Write a short poem about autumn leaves.",
                 "What are three tips for a job interview?", "Describe how a bicycle works.",
                 "Give me a recipe for tomato soup.", "Why do we have seasons on Earth?"]
    agree = total = 0
    for q in questions:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q * 4}]))[:64]
        ids = torch.tensor([ids])
        with torch.no_grad():
            a = smollm2.model.forward(ids).argmax(-1)
            b = quantized.model.forward(ids).argmax(-1)
        agree, total = agree + int((a == b).sum()), total + a.numel()
    return agree / total


@pytest.mark.slow
def test_int8_top1_agrees_with_fp32_on_smollm2(smollm2):
    """int8 per channel, with the 10% of projections whose int8 error is largest kept in fp16: the issue's
    bar is >= 0.98 over 64-token prompts (384 positions: one disagreement moves it by 0.26%)."""
    assert top1_agreement(smollm2, "int8") >= 0.98


@pytest.mark.slow
def test_int4_top1_agrees_with_fp32_on_smollm2(smollm2):
    """int4 from the GGUF's own Q4_1 blocks: the study measured 0.995 on chat replies. The fp32 model is
    the same Q4_1 weights dequantised, so only bf16 activations and the fp16 LM head differ; >= 0.97."""
    assert top1_agreement(smollm2, "int4") >= 0.97
