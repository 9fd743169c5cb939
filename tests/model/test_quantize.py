"""Weights in memory as int4 / int8 (server/model/quantize.py): the int4 grid read from Q4 GGUF blocks,
the quantized linears against a matmul with their own dequantised weights, the loader, and (slow) SmolLM2:
top-1 agreement with the float model, and the engine against the reference generator on int4 weights.

Tolerances. The int4 and int8 kernels take bf16 activations and return bf16 results: x and y are each
rounded to 8 significant bits, a relative error of at most 2^-9 per element, about 2^-9 / sqrt(3) = 0.11%
RMS for errors of random sign. Against x @ W_deq.T (W_deq with the kernel's own bf16 scales and zeros)
that is ~0.16% of the output's RMS; 1% is asserted: room for the kernel's summation order, while a wrong
nibble order, group scale or zero point moves the output by 10% or more. The fp16 LM head keeps fp32
activations and sums, so it equals x @ W_fp16.T up to fp32 summation order.
"""
import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.model.generate import generate as reference_generate
from server.model.gguf_reader import GGUFFile, gguf_tensor_name, read_config
from server.model.loader import load_model
from server.model.quantize import Fp16Linear, Int4Codes, Int4Linear, Int8Linear, is_quantized
from tests.engine.helpers import run_staggered


def rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_codes_from_gguf_blocks_are_the_files_own_values(tiny_gguf, qtype):
    """Each Q4 projection's codes dequantise to what the reader dequantises, Q/K rows un-permuted.
    Q4_0 (d * (q - 8)) is the same product on both sides: exact. Q4_1 is d * q + m in the file's
    dequantiser and (q - 8) * d + (m + 8d) here: equal up to fp32 rounding, ~1e-8 for weights ~0.3."""
    tiny = tiny_gguf(qtype, tied=True)
    f = GGUFFile(tiny.path)
    hf = read_config(f)
    for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
        name = gguf_tensor_name(f"model.layers.1.{p}.weight")
        codes = f.int4_codes(name, hf)
        assert codes is not None, name
        assert codes.q.dtype == torch.int32 and 0 <= int(codes.q.min()) and int(codes.q.max()) <= 15
        expected = f.tensor(name, hf)  # float32, Hugging Face row order
        if qtype == "Q4_0":
            assert torch.equal(codes.dequantize(), expected), name
        else:
            torch.testing.assert_close(codes.dequantize(), expected, rtol=0, atol=1e-6, msg=name)
    assert f.int4_codes("output_norm.weight", hf) is None  # not a Q4 matrix


def test_int4_codes_of_a_float_tensor_are_none(tiny_gguf):
    tiny = tiny_gguf("Q8_0")
    f = GGUFFile(tiny.path)
    assert f.int4_codes("blk.0.attn_q.weight", read_config(f)) is None


def kernel_dequantised(codes: Int4Codes) -> torch.Tensor:
    """W as the int4 kernel sees it: scales and zeros rounded to bf16 (Int4Linear stores them so)."""
    return Int4Codes(codes.q, codes.scale.bfloat16().float(), codes.zero.bfloat16().float()).dequantize()


@pytest.mark.parametrize("rows", [1, 7, 33])
def test_quantized_linears_equal_their_dequantised_matmul(rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(96, 128), torch.randn(96)
    x = torch.randn(rows, 3, 128)  # any leading shape
    codes = Int4Codes.from_float(weight)
    step = (weight.view(96, 4, 32).amax(-1) - weight.view(96, 4, 32).amin(-1)) / 15
    assert ((codes.dequantize() - weight).abs() <= step.repeat_interleave(32, 1) / 2 + 1e-6).all()  # nearest
    int8 = Int8Linear(weight, bias)
    cases = [(Int4Linear(codes, bias), kernel_dequantised(codes), 0.01),
             (int8, int8.qweight.float() * int8.scales.float()[:, None], 0.01),
             (Fp16Linear(weight, bias), weight.half().float(), 1e-6)]
    for module, dequantised, tolerance in cases:
        expected = x @ dequantised.T + bias
        got = module(x)
        assert got.shape == expected.shape and got.dtype == x.dtype
        assert rms(got - expected) <= tolerance * rms(expected), type(module).__name__


def test_fp16_head_rows_are_the_gemm_weights():
    weight = torch.randn(40, 32)
    head = Fp16Linear(weight)
    ids = torch.tensor([3, 0, 39])
    assert torch.equal(head.rows(ids), weight.half().float()[ids])


@pytest.mark.parametrize("qtype, mode, tolerance", [("Q4_1", "int4", 0.03), ("Q4_0", "int4", 0.03),
                                                    ("F32", "int8", 0.05)])
def test_quantized_gguf_load_holds_no_float_projection_and_stays_close(tiny_gguf, qtype, mode, tolerance):
    """Logits of the quantized load against the float load of the same file, 2 layers of 7 projections.
    int4 from Q4 blocks is the file's own grid: only the bf16 roundings differ, ~0.3% RMS per projection
    (above), ~1% over 14 of them (measured 0.8-1.0%); 3% asserted. int8 requantises float weights per
    channel: a weight moves by up to amax/254, ~0.7% RMS per projection, ~2.5% over 14 of them
    (measured 1.7%); 5% asserted."""
    tiny = tiny_gguf(qtype, tied=True)
    exact = load_model(str(tiny.path))
    quantized = load_model(str(tiny.path), quantization=mode)
    assert is_quantized(quantized.model) and not is_quantized(exact.model)
    assert quantized.fingerprint == exact.fingerprint  # the same checkpoint, whatever it is served as
    linears = Int4Linear if mode == "int4" else (Int8Linear, Fp16Linear)
    assert all(isinstance(layer.self_attn.kv_proj, linears) for layer in quantized.model.model.layers)
    tensors = list(quantized.model.named_parameters()) + list(quantized.model.named_buffers())
    float_matrices = [name for name, t in tensors if t.dtype == torch.float32 and t.dim() == 2]
    assert float_matrices == []  # projections packed int4 / int8 (or fp16), the head and embedding fp16
    assert quantized.model.model.embed_tokens.weight.dtype == torch.float16
    ids = torch.tensor([[5, 17, 3, 40, 8, 21, 9, 2, 30, 11, 60, 7]])
    with torch.no_grad():
        a, b = exact.model(ids), quantized.model(ids)
    assert rms(a - b) <= tolerance * rms(a)


def test_bad_quantization_requests_are_clear_errors(tiny_gguf):
    tiny = tiny_gguf("F32")
    with pytest.raises(ValueError, match="unknown quantization 'int3'; expected one of none, int8, int4"):
        load_model(str(tiny.path), quantization="int3")
    with pytest.raises(ValueError, match="CPU only"):
        load_model(str(tiny.path), device="cuda", quantization="int4")


# Questions whose chat prompt is followed by the fp32 model's own greedy reply up to SEQUENCE_LEN tokens.
QUESTIONS = ["Explain photosynthesis to a child.", "Write a short poem about autumn leaves.",
             "What are three tips for a job interview?", "Describe how a bicycle works.",
             "Give me a recipe for tomato soup.", "Why do we have seasons on Earth?",
             "Summarise the plot of Romeo and Juliet.", "How do I reverse a list in Python?"]
SEQUENCE_LEN = 64


@pytest.fixture(scope="module")
def sequences(smollm2) -> list[list[int]]:
    """Chat prompt + the fp32 model's greedy reply, SEQUENCE_LEN tokens each: text the model really
    produces, not repeated or random tokens (on which agreement says little)."""
    tokenizer = smollm2.tokenizer
    out = []
    for question in QUESTIONS:
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
        reply = reference_generate(smollm2.model, prompt, SEQUENCE_LEN - len(prompt), eos_token_ids=())
        out.append((prompt + reply.token_ids)[:SEQUENCE_LEN])
    return out


@pytest.fixture(scope="module")
def smollm2_int4(smollm2):
    return load_model(str(smollm2.path), quantization="int4")


def top1_agreement(reference, quantized, sequences: list[list[int]]) -> float:
    """Teacher-forced: the share of positions whose argmax next token is the same in both models."""
    agree = total = 0
    for ids in sequences:
        ids = torch.tensor([ids])
        with torch.no_grad():
            a, b = reference.model(ids).argmax(-1), quantized.model(ids).argmax(-1)
        agree, total = agree + int((a == b).sum()), total + a.numel()
    return agree / total


@pytest.mark.slow
def test_int8_top1_agrees_with_fp32_on_smollm2(smollm2, sequences):
    """int8 per channel with the 10% of projections whose int8 error is largest kept in fp16, against
    fp32 over 8 x 64 positions (one disagreement moves the share by 0.2%). The issue's bar: >= 0.98;
    measured 0.990, 507 of 512 (per channel without the fp16 share, an earlier study measured 0.962)."""
    agreement = top1_agreement(smollm2, load_model(str(smollm2.path), quantization="int8"), sequences)
    assert agreement >= 0.98, agreement


@pytest.mark.slow
def test_int4_top1_agrees_with_fp32_on_smollm2(smollm2, smollm2_int4, sequences):
    """int4 from the GGUF's own Q4_1 blocks against fp32 over 8 x 64 positions. The fp32 model holds the
    same Q4_1 weights dequantised, so only the bf16 activations, the bf16 scales and the fp16 LM head
    differ. Measured 0.992, 508 of 512 (an earlier study: 0.995 on chat replies); asserted >= 0.98, the
    int8 bar, 6 disagreements below the measurement."""
    agreement = top1_agreement(smollm2, smollm2_int4, sequences)
    assert agreement >= 0.98, agreement


@pytest.mark.slow
def test_engine_on_int4_equals_reference_generate_on_smollm2(smollm2_int4):
    """Greedy, full depth: the engine (paged KV, batched decode rows) and the plain generator on the same
    int4 model give the same tokens."""
    tokenizer = smollm2_int4.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
               for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    engine = LLMEngine(smollm2_int4.model, tokenizer, EngineConfig(max_num_seqs=4, max_model_len=256), None)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, early_exit=False)
    final = run_staggered(engine, prompts, params, arrivals=[0, 2])
    for i, prompt in enumerate(prompts):
        expected = reference_generate(smollm2_int4.model, prompt, 16, eos_token_ids=())
        assert final[str(i)].outputs[0].token_ids == expected.token_ids, i
