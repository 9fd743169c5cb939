"""Model hyper-parameters, with Hugging Face's config.json field names."""
from dataclasses import asdict, dataclass, field


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v/o (Llama's flag)
    attention_out_bias: bool | None = None  # None = attention_bias; Qwen2 has q/k/v biases only
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        names = cls.__dataclass_fields__.keys()
        values = {k: hf[k] for k in names if k in hf and hf[k] is not None}
        values.setdefault("num_key_value_heads", hf["num_attention_heads"])
        # Qwen2-style checkpoints have biases on q/k/v but no attention_bias flag.
        if hf.get("model_type") == "qwen2":
            values.setdefault("attention_bias", True)
            values.setdefault("attention_out_bias", False)
        eos = hf.get("eos_token_id")
        values["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_params = hf.get("rope_parameters")  # transformers >= 5 spelling
        if rope_params and "rope_theta" in rope_params:
            values.setdefault("rope_theta", rope_params["rope_theta"])
        return cls(**values)

    def to_hf(self) -> dict:
        hf = asdict(self)
        hf["model_type"] = "llama"
        hf["architectures"] = ["LlamaForCausalLM"]
        hf["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        return hf
