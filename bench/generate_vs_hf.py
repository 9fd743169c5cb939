"""Batch-1 full-depth greedy decode: `offramp generate`'s reference path vs transformers.generate.

Same weights (ours, loaded from the model source, copied into transformers' LlamaForCausalLM),
same prompt, same number of new tokens; the two run alternately (A, B, A, B, ...) and the
median of the repeats is reported.

    python -m bench.generate_vs_hf --max-tokens 128 --repeats 5
"""
import argparse
import statistics
import time

import torch

from server.model.fetch import DEFAULT_MODEL


def build_hf_model(loaded):
    import transformers

    hf_config = transformers.LlamaConfig(**loaded.config.to_hf())
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.load_state_dict(loaded.model.state_dict(), strict=False)
    model.generation_config.pad_token_id = loaded.tokenizer.eos_token_ids[0]
    return model


def main(argv=None):
    from server.model.generate import generate
    from server.model.loader import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    hf_model = build_hf_model(loaded)
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    prompt_ids = loaded.tokenizer.encode(text)
    input_ids = torch.tensor([prompt_ids])

    def run_ours():
        start = time.perf_counter()
        # eos disabled so both sides produce exactly max_tokens tokens
        out = generate(loaded.model, prompt_ids, args.max_tokens, eos_token_ids=())
        return len(out.token_ids), time.perf_counter() - start

    @torch.inference_mode()
    def run_hf():
        start = time.perf_counter()
        out = hf_model.generate(input_ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                do_sample=False)
        return out.shape[1] - input_ids.shape[1], time.perf_counter() - start

    run_ours(), run_hf()  # warm-up
    ours, hf = [], []
    for _ in range(args.repeats):
        n, s = run_ours()
        ours.append(n / s)
        n, s = run_hf()
        hf.append(n / s)
    ours_tps, hf_tps = statistics.median(ours), statistics.median(hf)
    print(f"prompt tokens {len(prompt_ids)}, new tokens {args.max_tokens}, threads {args.threads}, repeats {args.repeats}")
    print(f"{'implementation':<28}{'tokens/s (median)':>20}")
    print(f"{'offramp generate':<28}{ours_tps:>20.1f}")
    print(f"{'transformers.generate':<28}{hf_tps:>20.1f}")
    print(f"ratio offramp / transformers: {ours_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
