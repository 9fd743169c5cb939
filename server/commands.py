"""`offramp fetch` and `offramp generate` (the full-depth reference generator)."""
import sys

from server.model.fetch import DEFAULT_MODEL


def register(subparsers):
    fetch = subparsers.add_parser("fetch", help="download the model into $OFFRAMP_HOME so later runs are offline")
    fetch.add_argument("--model", default=DEFAULT_MODEL)
    fetch.set_defaults(func=run_fetch)

    gen = subparsers.add_parser("generate", help="generate with the reference (non-serving) path")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="alias, Hugging Face folder, or .gguf file")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=run_generate)


def run_fetch(args):
    from server.model.loader import load_model

    loaded = load_model(args.model)
    print(f"{loaded.name}: ready at {loaded.path}")


def run_generate(args):
    from server.model.generate import generate
    from server.model.loader import load_model

    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    loaded = load_model(args.model, device=args.device)
    tokenizer = loaded.tokenizer
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        text = args.prompt
    prompt_ids = tokenizer.encode(text)
    printed = ""
    generated: list[int] = []

    def stream(token: int):
        nonlocal printed
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    result = generate(loaded.model, prompt_ids, args.max_tokens, temperature=args.temperature, seed=args.seed,
                      eos_token_ids=tokenizer.eos_token_ids, on_token=stream)
    sys.stdout.write("\n")
    print(f"[{len(result.token_ids)} tokens in {result.seconds:.2f} s, {result.tokens_per_second:.1f} tokens/s]",
          file=sys.stderr)
